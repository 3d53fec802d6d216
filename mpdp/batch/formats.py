"""The two line formats of ``mpdp generate``: detecting them, reading a line, writing a result.

- **simple**: ``{"id", "prompt" | "messages" | "prompt_token_ids", <sampling fields>...}``;
  the output line is ``{"id", "text", "finish_reason", "usage"}`` (or ``{"id", "error", "param"}``).
- **openai**: the OpenAI batch line ``{"custom_id", "method": "POST", "url", "body"}`` with
  ``url`` ``/v1/chat/completions`` or ``/v1/completions``; the output line is the batch output
  ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` that
  ``vllm run-batch`` writes (and its output model accepts). The body is read by the same
  parser as ``mpdp serve``'s (``openai_api.request``), with the same verdicts, and the
  response body built by the same code; a batch file differs only in what it cannot do:
  stream (``stream: true`` fails its line, saying so). A failed line has ``response.body:
  null``, the status the server would answer in ``response.status_code``, and OpenAI's error
  object ``{"message", "type", "param", "code"}`` in ``error``.

A file has one format, taken from its first line. What a line must have to be a line of the
file at all (a JSON object, an id) is its *format*: a line without it raises
:class:`FormatError`, and the job refuses the file before any worker starts (results are
written and resumed by id). Everything else wrong with a line (a bad ``url`` or ``method``,
a body the server would refuse, a sampling value out of range, a model not served) fails that
line alone, in its place, as ``vllm run-batch`` does; it is found when the line is read, so
the job's pre-flight pass finds and counts it before any worker starts. Fields the job does
not use (``metadata``, an ``answer`` to grade against) are carried through to the output line.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from mpdp import errors
from mpdp.config import SAMPLING, check_sampling
from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes
from mpdp.requests import build_request, check_timeout

SIMPLE, OPENAI = "simple", "openai"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
URLS = {CHAT_URL: parsing.CHAT, COMPLETIONS_URL: parsing.COMPLETION}
_PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
# Per-request keys of the simple format; every other key is carried to the output line.
_SIMPLE_KEYS = frozenset(SAMPLING) | frozenset(_PROMPT_KEYS) | {"timeout"}
_OPENAI_KEYS = ("custom_id", "method", "url", "body")


class FormatError(ValueError):
    """A line that is not a line of the file's format (the job refuses the file up front)."""


@dataclass(slots=True, frozen=True)
class Rules:
    """What a line is checked against before any worker starts: the model names the job answers
    to (an OpenAI body's ``model``; the first is the default), and its engine and the sampling
    fields that engine serves (None: not checked)."""

    served: tuple[str, ...]
    engine: str = ""
    sampling_fields: frozenset[str] | None = None


@dataclass(slots=True)
class Item:
    """One input line, read. ``calls`` holds the ``Pool.submit`` keywords of its pool requests
    (one, or one per prompt of a completions ``prompt`` list); ``error`` (instead) is why the
    line fails alone; ``carry`` is copied onto the output line."""

    id: str | int
    kind: str                      # "simple", "chat" or "completion" ("openai" when the url is bad)
    calls: list[dict[str, Any]] | None
    error: Exception | None = None
    carry: dict[str, Any] = field(default_factory=dict)
    parsed: parsing.Parsed | None = None    # an OpenAI line's body, read


def detect(obj: Any) -> str:
    """The format of a file, from its first line (already JSON-decoded): an OpenAI batch line
    has its batch keys (a line that lacks only its ``custom_id`` is still one, and is refused
    for that, not for lacking a prompt). A line with a prompt and no ``custom_id`` is simple:
    its ``url``, ``method`` or ``body`` are fields carried to the output, as on any other line."""
    if not isinstance(obj, dict):
        return SIMPLE
    if "custom_id" in obj:
        return OPENAI
    return SIMPLE if any(k in obj for k in _PROMPT_KEYS) else \
        OPENAI if any(k in obj for k in _OPENAI_KEYS) else SIMPLE


def decode(text: str | bytes, lineno: int) -> dict:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"line {lineno} is not JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"line {lineno} is JSON nested too deeply") from None
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


def parse(obj: dict, lineno: int, fmt: str, rules: Rules) -> Item:
    """An Item from one decoded line of a file of format ``fmt``; FormatError if it is not one."""
    return _parse_openai(obj, lineno, rules) if fmt == OPENAI else _parse_simple(obj, lineno, rules)


_INT64 = 1 << 63


def id_key(item_id: str | int) -> int:
    """A 64-bit key of an id for :class:`mpdp.batch.ids.IdSet`. Two ids share one only by chance
    (1 in 2**64 a pair), never by their shape: an int that fits in 64 bits is its own key (Python's
    ``hash`` of an int is not: ``hash(-1) == hash(-2)``, and ints equal modulo 2**61 - 1 share
    one, so a resume took one of them for the other, done); a string is hashed, and so is a
    larger int, tagged so that it never matches the string of its digits."""
    if type(item_id) is str:
        return hash(item_id)
    if -_INT64 <= item_id < _INT64:
        return item_id
    return hash(("int", str(item_id)))


def _parse_simple(obj: dict, lineno: int, rules: Rules) -> Item:
    if "custom_id" in obj:
        raise FormatError(f"line {lineno} is an OpenAI batch line, but the file's first line is in the "
                          "simple format; one file holds one format")
    item_id = obj.get("id", lineno)            # no id: the line number (stable, so resume works)
    if type(item_id) not in (str, int):
        raise FormatError(f"line {lineno}: id must be a string or an integer, not {type(item_id).__name__}")
    carry = {k: v for k, v in obj.items() if k not in _SIMPLE_KEYS and k != "id"}
    request = {k: v for k, v in obj.items() if k in _SIMPLE_KEYS}
    try:
        if not any(k in obj for k in _PROMPT_KEYS):
            raise errors.InvalidRequest("the line has none of prompt, messages or prompt_token_ids", "prompt")
        sampling = {k: v for k, v in request.items() if k in SAMPLING}
        check_sampling(sampling)
        check_timeout(request.get("timeout"))        # as Pool.submit would, before any worker starts
        _check_call(request, sampling, rules)
    except (ValueError, TypeError) as exc:
        return Item(item_id, SIMPLE, None, error=exc, carry=carry)
    return Item(item_id, SIMPLE, [request], carry=carry)


def _parse_openai(obj: dict, lineno: int, rules: Rules) -> Item:
    custom_id = obj.get("custom_id")
    if "custom_id" not in obj:
        raise FormatError(f"line {lineno} has no custom_id (every OpenAI batch line needs its own; the file's "
                          "first line is an OpenAI batch line, and one file holds one format)")
    if not isinstance(custom_id, str) or not custom_id:
        raise FormatError(f"line {lineno}: custom_id must be a non-empty string, not {custom_id!r}")
    carry = {k: v for k, v in obj.items() if k not in _OPENAI_KEYS}
    url = obj.get("url")
    kind = URLS.get(url) if isinstance(url, str) else None
    try:
        if obj.get("method", "POST") != "POST":
            raise errors.InvalidRequest(f"method must be POST, not {obj.get('method')!r}", "method")
        if kind is None:
            raise errors.InvalidRequest(f"url {url!r} is not served; the url must be "
                                        f"{' or '.join(URLS)}", "url")
        p = parsing.parse(obj.get("body"), kind, list(rules.served), streaming=False)
        calls = p.pool_calls()
        for call in calls:
            _check_call(call, p.sampling, rules)
    except (ValueError, TypeError) as exc:
        return Item(custom_id, kind or OPENAI, None, error=exc, carry=carry)
    return Item(custom_id, kind, calls, carry=carry, parsed=p)


def _check_call(call: dict, sampling: dict, rules: Rules) -> None:
    """What ``Pool.submit`` checks, without a pool: the engine serves the sampling fields, and the
    prompt or messages make a request (their shape, their size on the wire)."""
    if rules.sampling_fields is not None:
        unsupported = set(sampling) - rules.sampling_fields
        if unsupported:
            raise ValueError(f"the {rules.engine} engine does not support {', '.join(sorted(unsupported))}")
    build_request(0, call.get("prompt"), call.get("messages"), call.get("prompt_token_ids"), sampling)


# -- output lines ------------------------------------------------------------------------------------
def output_id(row: Any, fmt: str) -> str | int | None:
    """The id an output line was written for (None when it has none: not a line of this format)."""
    if not isinstance(row, dict):
        return None
    item_id = row.get("custom_id") if fmt == OPENAI else row.get("id")
    return item_id if type(item_id) in (str, int) else None


def result_row(item: Item, completions: list) -> dict:
    """The output line of a finished line (``completions``: one ``mpdp.Completion`` per pool call)."""
    if item.kind == SIMPLE:
        (completion,) = completions
        row: dict[str, Any] = {"id": item.id, "text": completion.text,
                               "finish_reason": shapes.finish_reason(completion.finish_reason),
                               "usage": {"prompt_tokens": completion.prompt_tokens,
                                         "completion_tokens": completion.completion_tokens}}
        if len(completion.choices) > 1:
            row["choices"] = completion.choices
        return _with_carry(row, item)
    p = item.parsed
    body = shapes.response(p, shapes.new_id(p.kind), int(time.time()), completions)
    return _batch_row(item, 200, body, None)


def error_row(item: Item, exc: BaseException) -> dict:
    """The output line of a line that failed alone: its error read once (``errors.classify``)."""
    err = shapes.api_error(exc, item.parsed)
    if item.kind == SIMPLE:
        row = {"id": item.id, "error": err.message}
        if err.param is not None:
            row["param"] = err.param
        return _with_carry(row, item)
    return _batch_row(item, err.status, None, err.error())


def _batch_row(item: Item, status: int, body: dict, error: dict | None) -> dict:
    row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.id,
           "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
           "error": error}
    return _with_carry(row, item)


def _with_carry(row: dict, item: Item) -> dict:
    for key, value in item.carry.items():
        row.setdefault(key, value)          # a carried field never hides a result field
    return row
