"""The two line formats of ``mpdp generate``: detecting them, reading a line, writing a result.

- **simple**: ``{"id", "prompt" | "messages" | "prompt_token_ids", <sampling fields>...}``;
  the output line is ``{"id", "text", "finish_reason", "usage"}`` (or ``{"id", "error"}``).
- **openai**: the OpenAI batch line ``{"custom_id", "method": "POST", "url", "body"}`` with
  ``url`` ``/v1/chat/completions`` or ``/v1/completions``; the output line is OpenAI's batch
  output ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
  with a ``chat.completion`` / ``text_completion`` body, as ``vllm run-batch`` writes it.

A file has one format, taken from its first line. What a line must have to be a request at all
(a JSON object, an id, a prompt or messages, a known url) is its *format*: a line without it
raises :class:`FormatError`, and the job refuses the file before any worker starts. What only
the request's values can get wrong (a negative temperature, an empty prompt, a field mpdp does
not serve) fails that line alone, with an error written in its place. Fields the job does not
use (``metadata``, an ``answer`` to grade against) are carried through to the output line.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from mpdp.config import SAMPLING

SIMPLE, OPENAI = "simple", "openai"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
_PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
# Per-request keys of the simple format; every other key is carried to the output line.
_SIMPLE_KEYS = frozenset(SAMPLING) | frozenset(_PROMPT_KEYS) | {"timeout"}
# OpenAI body fields that map one to one onto mpdp's sampling keywords (vLLM's names).
_BODY_SAMPLING = frozenset(SAMPLING) - {"logprobs"}
# Body fields that change nothing for a batch job; every other unknown field with a truthy value
# fails the request, so a request that asks for tools is never answered as if it had not.
_BODY_IGNORED = frozenset({"model", "user", "store", "metadata", "stream_options", "service_tier"})


class FormatError(ValueError):
    """A line that is not a request of the file's format (the job refuses the file up front)."""


@dataclass(slots=True)
class Item:
    """One input line, read. ``request`` holds ``Pool.submit`` keywords; ``error`` (instead) says
    why the request fails alone; ``carry`` is copied onto the output line."""

    id: str | int
    kind: str                      # "simple", "chat" or "completion"
    request: dict[str, Any] | None
    error: str | None = None
    carry: dict[str, Any] = field(default_factory=dict)
    model: str | None = None       # the body's "model" (openai), echoed in the response body


def detect(obj: Any) -> str:
    """The format of a file, from its first line (already JSON-decoded)."""
    return OPENAI if isinstance(obj, dict) and "custom_id" in obj else SIMPLE


def decode(text: str | bytes, lineno: int) -> dict:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"line {lineno} is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"line {lineno} is a JSON {type(obj).__name__}, not an object")
    return obj


def read_objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, decoded object) for every non-blank line; FormatError at the first bad one.

    Binary mode: a line that is not UTF-8 is then a FormatError naming its line, where text
    mode would fail somewhere in the middle of the file without saying where.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, decode(raw, lineno)


def parse(obj: dict, lineno: int, fmt: str) -> Item:
    """An Item from one decoded line of a file of format ``fmt``; FormatError if it is not one."""
    return _parse_openai(obj, lineno) if fmt == OPENAI else _parse_simple(obj, lineno)


def id_key(item_id: str | int) -> int:
    """A 64-bit key of an id for :class:`mpdp.batch.ids.IdSet` (a string and an int never match)."""
    return hash(item_id) if type(item_id) is str else hash((0, item_id))


def _parse_simple(obj: dict, lineno: int) -> Item:
    if "custom_id" in obj:
        raise FormatError(f"line {lineno} is an OpenAI batch line, but the file's first line is in the "
                          "simple format; one file holds one format")
    item_id = obj.get("id", lineno)            # no id: the line number (stable, so resume works)
    if type(item_id) not in (str, int):
        raise FormatError(f"line {lineno}: id must be a string or an integer, not {type(item_id).__name__}")
    if not any(k in obj for k in _PROMPT_KEYS):
        raise FormatError(f"line {lineno} has none of prompt, messages or prompt_token_ids")
    request = {k: v for k, v in obj.items() if k in _SIMPLE_KEYS}
    carry = {k: v for k, v in obj.items() if k not in _SIMPLE_KEYS and k != "id"}
    return Item(item_id, "simple", request, carry=carry)


def _parse_openai(obj: dict, lineno: int) -> Item:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise FormatError(f"line {lineno}: custom_id must be a non-empty string (one file holds one format; "
                          "the first line is an OpenAI batch line)")
    if obj.get("method", "POST") != "POST":
        raise FormatError(f"line {lineno}: method must be POST, not {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise FormatError(f"line {lineno}: url must be {' or '.join(URLS)}, not {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise FormatError(f"line {lineno}: body must be a JSON object")
    needed = "messages" if url == CHAT_URL else "prompt"
    if needed not in body:
        raise FormatError(f"line {lineno}: the body of a {url} request needs {needed!r}")
    carry = {k: v for k, v in obj.items() if k not in ("custom_id", "method", "url", "body")}
    kind = "chat" if url == CHAT_URL else "completion"
    model = body.get("model") if isinstance(body.get("model"), str) else None
    try:
        request = _body_request(body, kind)
    except ValueError as exc:
        return Item(custom_id, kind, None, error=str(exc), carry=carry, model=model)
    return Item(custom_id, kind, request, carry=carry, model=model)


def _body_request(body: dict, kind: str) -> dict:
    """Pool.submit keywords from an OpenAI request body; ValueError for what mpdp does not serve."""
    request: dict[str, Any] = {}
    if kind == "chat":
        request["messages"] = body["messages"]
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            request["prompt_token_ids"] = prompt
        elif isinstance(prompt, list) and len(prompt) == 1:
            request["prompt"] = prompt[0]
        elif isinstance(prompt, list):
            raise ValueError("prompt: one prompt a line (a list of several prompts is not served)")
        else:
            request["prompt"] = prompt
    unsupported = []
    for key, value in body.items():
        if key in ("messages", "prompt") or key in _BODY_IGNORED:
            continue
        if key in _BODY_SAMPLING:
            request[key] = value
        elif key == "max_completion_tokens":       # OpenAI's newer name for max_tokens
            request["max_tokens"] = value
        elif value:                                # stream, logprobs, tools, echo, ... when asked for
            unsupported.append(key)
    if unsupported:
        raise ValueError(f"unsupported body field(s): {', '.join(sorted(unsupported))}")
    return request


# -- output lines ------------------------------------------------------------------------------------
def output_id(row: Any, fmt: str) -> str | int | None:
    """The id an output line was written for (None when it has none: not a line of this format)."""
    if not isinstance(row, dict):
        return None
    item_id = row.get("custom_id") if fmt == OPENAI else row.get("id")
    return item_id if type(item_id) in (str, int) else None


def result_row(item: Item, completion, model: str) -> dict:
    """The output line of a finished request (``completion`` is an ``mpdp.Completion``)."""
    if item.kind == "simple":
        row: dict[str, Any] = {"id": item.id, "text": completion.text, "finish_reason": completion.finish_reason,
                               "usage": {"prompt_tokens": completion.prompt_tokens,
                                         "completion_tokens": completion.completion_tokens}}
        if len(completion.choices) > 1:
            row["choices"] = completion.choices
        return _with_carry(row, item)
    if item.kind == "chat":
        obj, choices = "chat.completion", [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": fr}
            for i, (text, fr) in enumerate(zip(completion.choices, completion.finish_reasons))]
    else:
        obj, choices = "text_completion", [
            {"index": i, "text": text, "logprobs": None, "finish_reason": fr}
            for i, (text, fr) in enumerate(zip(completion.choices, completion.finish_reasons))]
    body = {"id": f"{'chatcmpl' if item.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
            "created": int(time.time()), "model": item.model or model, "choices": choices,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion.completion_tokens}}
    return _batch_row(item, 200, body, None)


def error_row(item: Item, message: str, exc: BaseException | None = None) -> dict:
    """The output line of a request that failed alone."""
    if item.kind == "simple":
        return _with_carry({"id": item.id, "error": message}, item)
    # A bad request is the caller's (400, as the OpenAI server answers it); anything else is ours.
    client = exc is None or isinstance(exc, (ValueError, TypeError))
    status, code = (400, "invalid_request_error") if client else (500, "server_error")
    body = {"error": {"message": message, "type": code, "param": None, "code": None}}
    return _batch_row(item, status, body, {"code": code, "message": message})


def _batch_row(item: Item, status: int, body: dict, error: dict | None) -> dict:
    row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.id,
           "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
           "error": error}
    return _with_carry(row, item)


def _with_carry(row: dict, item: Item) -> dict:
    for key, value in item.carry.items():
        row.setdefault(key, value)          # a carried field never hides a result field
    return row
