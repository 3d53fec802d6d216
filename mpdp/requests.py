"""Checking what callers send, in the caller's thread, before anything reaches the dispatcher.

Every check raises ``ValueError`` or ``TypeError`` naming the field, so a bad request fails at
``submit`` and never touches the pool. What only the engine can know (the prompt's length in
tokens against the context) is checked in the worker and fails that request alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mpdp import protocol
from mpdp.engines.base import EngineRequest

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_TOKENS_LIMIT = 1 << 20          # beyond any context window: a typo, not a request
MAX_N = 128


@dataclass(slots=True, frozen=True)
class Completion:
    """One finished request. ``text``/``finish_reason`` are the first choice's; ``choices`` has all n."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    worker: int
    choices: list[str]
    finish_reasons: list[str]
    logprobs: list[Any] | None = None


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _temperature(v):
    v = _float("temperature", v)
    if v < 0:
        raise ValueError(f"temperature must be >= 0, got {v}")
    return v


def _top_p(v):
    v = _float("top_p", v)
    if not 0 < v <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {v}")
    return v


def _penalty(name):
    def check(v):
        v = _float(name, v)
        if not -2 <= v <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {v}")
        return v
    return check


def _stop(v):
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise TypeError("stop must be a non-empty string or a list of non-empty strings")
    return list(v)


def _seed(v):
    return None if v is None else _int("seed", v, -(2**63), 2**63 - 1)


def _logprobs(v):
    return None if v is None else _int("logprobs", v, 0, 20)


def _bool(name):
    def check(v):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, not {type(v).__name__}")
        return v
    return check


def _response_format(v):
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError("response_format must be a dict with type 'text', 'json_object' or 'json_schema'")
    if v["type"] == "json_schema" and not isinstance(v.get("json_schema"), dict):
        raise ValueError("response_format of type 'json_schema' needs a 'json_schema' dict")
    return v


def _dict(name):
    def check(v):
        if v is not None and not isinstance(v, dict):
            raise TypeError(f"{name} must be a dict, not {type(v).__name__}")
        return v
    return check


# The sampling keywords (vLLM SamplingParams names) and how each is checked.
SAMPLING = {
    "max_tokens": lambda v: _int("max_tokens", v, 1, MAX_TOKENS_LIMIT),
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": lambda v: _int("top_k", v, -1, 1 << 30),
    "n": lambda v: _int("n", v, 1, MAX_N),
    "stop": _stop,
    "seed": _seed,
    "presence_penalty": _penalty("presence_penalty"),
    "frequency_penalty": _penalty("frequency_penalty"),
    "logprobs": _logprobs,
    "ignore_eos": _bool("ignore_eos"),
    "response_format": _response_format,
    "chat_template_kwargs": _dict("chat_template_kwargs"),
}


def check_sampling(params: dict[str, Any]) -> dict[str, Any]:
    """Validated copy of ``params``; TypeError for an unknown keyword (as Python does for calls)."""
    out = {}
    for key, value in params.items():
        check = SAMPLING.get(key)
        if check is None:
            raise TypeError(f"unknown sampling keyword {key!r}; known: {', '.join(sorted(SAMPLING))}")
        value = check(value)
        if value is not None:
            out[key] = value
    return out


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict, not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise ValueError(f"messages[{i}] has no 'role'")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; known: {', '.join(sorted(ROLES))}")
        if isinstance(content, list):   # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError(f"messages[{i}].content parts must all be of type 'text'")
            content = "".join(p.get("text", "") for p in content)
        if content is None:
            raise ValueError(f"messages[{i}] has no 'content'")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a string, not {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def build_request(request_id: int, prompt: Any, messages: Any, prompt_token_ids: Any,
                  params: dict[str, Any]) -> EngineRequest:
    """An EngineRequest from caller input, or ValueError/TypeError naming the bad field."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages),
                                  ("prompt_token_ids", prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, messages or prompt_token_ids"
                         + (f" (got {', '.join(given)})" if given else " (got none)"))
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty")
    elif messages is not None:
        messages = _check_messages(messages)
    else:
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise ValueError("prompt_token_ids must be a non-empty list of ints")
        if not all(type(t) is int and t >= 0 for t in prompt_token_ids):
            raise TypeError("prompt_token_ids must hold non-negative ints")
        prompt_token_ids = list(prompt_token_ids)
    req = EngineRequest(request_id, prompt, messages, prompt_token_ids, params)
    size = protocol.check_encodable(protocol.request_to_wire(req), "the request")
    if size > protocol.MAX_FRAME_BYTES // 2:
        raise ValueError(f"the request is {size} bytes on the wire; the limit is {protocol.MAX_FRAME_BYTES // 2}")
    return req


def estimate_cost(req: EngineRequest) -> int:
    """Tokens this request will cost, roughly: prompt (4 characters a token) plus what it may generate."""
    if req.prompt is not None:
        prompt = len(req.prompt) // 4
    elif req.messages is not None:
        prompt = sum(len(m["content"]) for m in req.messages) // 4
    else:
        prompt = len(req.prompt_token_ids)
    return 1 + prompt + req.params.get("max_tokens", 16) * req.params.get("n", 1)


def prefix_key(req: EngineRequest, chars: int = 256) -> int | None:
    """A hash of the start of the prompt, for prefix-cache affinity."""
    if req.prompt is not None:
        return hash(req.prompt[:chars])
    if req.messages is not None:
        return hash(req.messages[0]["content"][:chars])
    return hash(tuple(req.prompt_token_ids[:chars // 4]))
