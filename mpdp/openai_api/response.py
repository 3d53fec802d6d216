"""``Completion``s -> OpenAI response bodies, stream chunks, usage and logprobs; exceptions ->
OpenAI error bodies with their HTTP status. Pure functions over dicts.

Finish reasons are mapped here, once for every door (DSPy too): the engines say "stop",
"length" or "abort" ("" in a partial result); OpenAI's clients know "stop" and "length", and
vLLM's server passes "abort" through.
"""

from __future__ import annotations

import codecs
import time
import uuid
from typing import Any

from mpdp import errors
from mpdp.openai_api.request import CHAT, Parsed

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "": "stop"}

# errors.classify's kinds as OpenAI answers them: (HTTP status, error type, error code).
STATUS = {
    errors.INVALID: (400, "invalid_request_error", None),
    errors.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    errors.CONTEXT: (400, "invalid_request_error", "context_length_exceeded"),
    errors.UNAVAILABLE: (503, "service_unavailable_error", "pool_unavailable"),
    errors.TIMEOUT: (504, "timeout_error", "request_timeout"),
    errors.ENGINE: (500, "server_error", None),
    errors.INTERNAL: (500, "server_error", None),
}


def finish_reason(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", reason)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def error(self) -> dict:
        return self.body()["error"]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def api_error(exc: BaseException, p: Parsed | None = None) -> APIError:
    """Any exception of a request (the parser's, the pool's at submit, or the request's own
    failure) as OpenAI answers it."""
    if isinstance(exc, APIError):
        return exc
    failure = errors.classify(exc, p.renames if p is not None else None)
    status, type_, code = STATUS[failure.kind]
    param = failure.param
    if failure.kind == errors.CONTEXT:
        param = "messages" if p is not None and p.kind == CHAT else "prompt"
    return APIError(status, failure.message, type_, param, code)


# -- responses ---------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def usage(completions) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    done = sum(c.completion_tokens for c in completions)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    cached = [getattr(c, "cached_tokens", None) for c in completions]
    if any(n is not None for n in cached):     # the engine counts prompt tokens served from its cache
        out["prompt_tokens_details"] = {"cached_tokens": sum(n or 0 for n in cached)}
    return out


def response(p: Parsed, rid: str, created: int, completions: list) -> dict:
    """The whole (non-streamed) response body for the completions of ``p.inputs``, in order."""
    choices = []
    for i, c in enumerate(completions):
        for j, (text, reason) in enumerate(zip(c.choices, c.finish_reasons)):
            lp = choice_logprobs(p, c, j)
            if p.kind == CHAT:
                choices.append({"index": i * p.n + j, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": finish_reason(reason)})
            else:
                choices.append({"index": i * p.n + j, "text": text, "logprobs": lp,
                                "finish_reason": finish_reason(reason)})
    return {"id": rid, "object": "chat.completion" if p.kind == CHAT else "text_completion",
            "created": created, "model": p.model, "choices": choices, "usage": usage(completions)}


def chunk(p: Parsed, rid: str, created: int, index: int, text: str | None, reason: str | None = None,
          logprobs: Any = None, role: bool = False, usage: dict | None = None) -> dict:
    """One streamed chunk for one choice (as vLLM sends them: one choice a chunk); ``usage``
    on every chunk when the client asked for ``continuous_usage_stats``."""
    if p.kind == CHAT:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": p.model,
               "choices": [choice]}
    else:
        out = {"id": rid, "object": "text_completion", "created": created, "model": p.model,
               "choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]}
    if usage is not None:
        out["usage"] = usage
    return out


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage of a stream so far (vLLM's continuous_usage_stats)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk(p: Parsed, rid: str, created: int, completions: list) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if p.kind == CHAT else "text_completion",
            "created": created, "model": p.model, "choices": [], "usage": usage(completions)}


def choice_logprobs(p: Parsed, c, j: int) -> dict | None:
    """OpenAI's logprobs object of choice ``j`` of a Completion (``engines.logprobs`` records).
    Chat: ``content`` with the top ``top_logprobs`` alternatives of each token. Completions:
    ``top_logprobs`` is a dict per token of the chosen token and its top alternatives (the chosen
    one alone for ``logprobs: 0``), as OpenAI's legacy API and vLLM give it."""
    if not p.logprobs or not c.logprobs or j >= len(c.logprobs) or c.logprobs[j] is None:
        return None
    records = c.logprobs[j]
    if p.kind == CHAT:
        return {"content": [{"token": e["token"], "logprob": _finite(e["logprob"]), "bytes": e["bytes"],
                             "top_logprobs": [{"token": t["token"], "logprob": _finite(t["logprob"]),
                                               "bytes": t["bytes"]} for t in e["top_logprobs"][:p.top_logprobs]]}
                            for e in records]}
    offsets, at, text = [], 0, codecs.getincrementaldecoder("utf-8")("replace")
    for e in records:        # characters of the text before each token (a split character counts once)
        offsets.append(at)
        at += len(text.decode(bytes(e["bytes"])))
    return {"tokens": [e["token"] for e in records],
            "token_logprobs": [_finite(e["logprob"]) for e in records],
            "top_logprobs": [{e["token"]: _finite(e["logprob"]),
                              **{t["token"]: _finite(t["logprob"]) for t in e["top_logprobs"][:p.top_logprobs]}}
                             for e in records],
            "text_offset": offsets}


def _finite(v):
    # JSON has no -inf: a token of probability zero under the raw distribution gets OpenAI's floor.
    if v is None:
        return None
    return max(float(v), -9999.0)


def models_body(served: list[str], root: str, max_model_len: int | None) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "mpdp",
                                        "root": root, "parent": None, "max_model_len": max_model_len}
                                       for name in served]}
