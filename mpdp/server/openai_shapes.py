"""OpenAI's wire shapes: request bodies in, ``Pool`` keywords out; ``Completion``s in, response
bodies, stream chunks and error bodies out. Pure functions over dicts: no HTTP, no pool.

A body field is one of: a sampling field the pool checks itself (its ``ValueError``/``TypeError``
names the field and becomes a 400 with that ``param``); a field handled here (``model``,
``messages``/``prompt``, ``stream``, ``stream_options``, ``logprobs``/``top_logprobs``,
``max_completion_tokens``); a field that changes nothing (``user``, ``metadata``, ...); or a
field mpdp does not serve (``tools``, ``logit_bias``, ``echo``, vLLM's ``min_p`` ...). The last
kind is refused with a 400 naming it when it asks for something (a value other than its
default), so a request that asks for tools is never answered as if it had not; a field nobody
knows is refused the same way, as a typo would otherwise be silently ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mpdp.config import SAMPLING

CHAT, COMPLETION = "chat", "completion"
MAX_PROMPTS = 1024               # prompts in one /v1/completions request (each is one pool request)

# Body fields passed to the pool under the same name (vLLM's SamplingParams names).
_SAMPLING = {"temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
             "top_k", "ignore_eos", "response_format"}
_CHAT_SAMPLING = _SAMPLING | {"chat_template_kwargs"}
# Fields that change nothing for this server, whatever their value.
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "request_id", "priority"}
# Fields mpdp does not serve, with the values that ask for nothing (accepted, ignored).
_UNSERVED_DEFAULTS: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "logit_bias": (None, {}), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False), "reasoning_effort": (None,),
    "web_search_options": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,),
}
# Names a pool error message may start with, to report as the error's ``param``.
_PARAMS = set(SAMPLING) | {"messages", "prompt", "prompt_token_ids", "max_completion_tokens", "top_logprobs",
                           "model", "stream", "stream_options", "timeout"}


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The field a pool error names (its messages start with it: ``"temperature must be >= 0"``)."""
    m = (re.match(r"unknown sampling keyword '(\w+)'", message)
         or re.match(r"the \S+ engine does not support (\w+)", message)
         or re.match(r"([a-z_]+)(?:\[\d+\])?\b", message))
    if m and m.group(1) in _PARAMS:
        return (renames or {}).get(m.group(1), m.group(1))
    return None


@dataclass(slots=True)
class Parsed:
    """One HTTP request, as pool calls: ``inputs`` are the prompt keywords of each pool request
    (one for chat, one per prompt for completions), ``sampling`` their shared sampling keywords."""

    kind: str
    model: str
    inputs: list[dict[str, Any]]
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False            # the response carries logprobs
    top_logprobs: int = 0
    renames: dict[str, str] = field(default_factory=dict)   # pool field -> the client's name for it

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


def parse(body: Any, kind: str, served: list[str]) -> Parsed:
    """A request body -> ``Parsed``; APIError (400, or 404 for an unknown model) for what is wrong
    before the pool sees it. Values of sampling fields are left to the pool's own checks."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {_json_type(body)}")
    body = dict(body)
    model = body.pop("model", None)
    if model is None:
        model = served[0]                      # as vLLM's server: the model is optional
    elif not isinstance(model, str):
        raise bad(f"model must be a string, not {_json_type(model)}", "model")
    elif model not in served:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {', '.join(served)}",
                       "invalid_request_error", "model", "model_not_found")
    sampling: dict[str, Any] = {}
    renames: dict[str, str] = {}
    if kind == CHAT:
        if "messages" not in body:
            raise bad("messages is required", "messages")
        inputs = [{"messages": body.pop("messages")}]
        names = _CHAT_SAMPLING
        tokens = body.pop("max_completion_tokens", None)
        legacy = body.pop("max_tokens", None)
        if tokens is not None:                 # OpenAI's newer name wins, as in vLLM
            sampling["max_tokens"], renames["max_tokens"] = tokens, "max_completion_tokens"
        elif legacy is not None:
            sampling["max_tokens"] = legacy
    else:
        if "prompt" not in body:
            raise bad("prompt is required", "prompt")
        inputs = _prompts(body.pop("prompt"))
        names = _SAMPLING
        if body.get("max_tokens") is not None:
            sampling["max_tokens"] = body.pop("max_tokens")
        body.pop("max_tokens", None)
    stream = body.pop("stream", None)
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, not {_json_type(stream)}", "stream")
    include_usage = _stream_options(body.pop("stream_options", None), bool(stream))
    logprobs, top = _logprobs(body, kind, sampling)
    refused = []
    for key, value in body.items():
        if key in names:
            if value is not None:
                sampling[key] = value
        elif key in _IGNORED:
            continue
        elif key in _UNSERVED_DEFAULTS:
            if not _is_default(value, _UNSERVED_DEFAULTS[key]):
                refused.append(key)
        else:
            raise bad(f"unknown field {key!r}", key)
    if refused:
        raise bad(f"{', '.join(refused)}: not supported by this server", refused[0])
    return Parsed(kind, model, inputs, sampling, bool(stream), include_usage, logprobs, top, renames)


def _is_default(value: Any, defaults: tuple) -> bool:
    # True == 1 in Python: a boolean matches only a boolean default.
    return any(value is None if d is None else (value == d and isinstance(value, bool) == isinstance(d, bool))
               for d in defaults)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _prompts(prompt: Any) -> list[dict]:
    """/v1/completions' ``prompt``: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    if all(type(t) is int for t in prompt):
        return [{"prompt_token_ids": prompt}]
    if len(prompt) > MAX_PROMPTS:
        raise bad(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
              "(not a mixture)", "prompt")


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise bad(f"stream_options must be an object, not {_json_type(options)}", "stream_options")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise bad(f"unknown stream_options field(s): {', '.join(sorted(unknown))}", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage must be a boolean", "stream_options")
    return include


def _logprobs(body: dict, kind: str, sampling: dict) -> tuple[bool, int]:
    """Chat: ``logprobs`` (bool) and ``top_logprobs`` (0..20); completions: ``logprobs`` (an int,
    the number of alternatives). The pool's ``logprobs`` is the number of alternatives."""
    value = body.pop("logprobs", None)
    top = body.pop("top_logprobs", None) if kind == CHAT else None
    if kind == COMPLETION:
        if value is None:
            return False, 0
        sampling["logprobs"] = value          # the pool checks it (an int in 0..20)
        return True, value if isinstance(value, int) else 0
    if value is not None and not isinstance(value, bool):
        raise bad(f"logprobs must be a boolean, not {_json_type(value)}", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise bad(f"top_logprobs must be an integer between 0 and 20, got {top!r}", "top_logprobs")
        if not value:
            raise bad("top_logprobs needs logprobs to be true", "top_logprobs")
    if not value:
        return False, 0
    sampling["logprobs"] = top or 0
    return True, top or 0


# -- responses ---------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def usage(completions) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    done = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def finish_reason(reason: str) -> str:
    # The engines say "stop", "length" or "abort"; OpenAI's clients know "stop" and "length".
    return reason if reason in ("stop", "length") else "stop" if not reason else reason


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
          logprobs: Any = None, role: bool = False) -> dict:
    """One streamed chunk for one choice (as vLLM sends them: one choice a chunk)."""
    if p.kind == CHAT:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": p.model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": p.model,
            "choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]}


def usage_chunk(p: Parsed, rid: str, created: int, completions: list) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if p.kind == CHAT else "text_completion",
            "created": created, "model": p.model, "choices": [], "usage": usage(completions)}


def choice_logprobs(p: Parsed, c, j: int) -> dict | None:
    """OpenAI's logprobs object of choice ``j`` of a Completion. The engines give either a list of
    {"token", "logprob", "top_logprobs"} entries (hf) or the chosen tokens' logprobs alone (vllm,
    whose tokens' text is then unknown here and left empty)."""
    if not p.logprobs or not c.logprobs or j >= len(c.logprobs) or c.logprobs[j] is None:
        return None
    entries = [e if isinstance(e, dict) else {"token": "", "logprob": e} for e in c.logprobs[j]]
    if p.kind == CHAT:
        return {"content": [{"token": e.get("token", ""), "logprob": _finite(e.get("logprob")),
                             "bytes": list(e.get("token", "").encode()),
                             "top_logprobs": [{"token": t.get("token", ""), "logprob": _finite(t.get("logprob")),
                                               "bytes": list(t.get("token", "").encode())}
                                              for t in (e.get("top_logprobs") or [])[:p.top_logprobs]]}
                            for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.get("token", ""))
    return {"tokens": [e.get("token", "") for e in entries],
            "token_logprobs": [_finite(e.get("logprob")) for e in entries],
            "top_logprobs": [{t.get("token", ""): _finite(t.get("logprob")) for t in (e.get("top_logprobs") or [])}
                             for e in entries] if p.top_logprobs else None,
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
