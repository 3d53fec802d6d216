"""Checking what callers send, in the caller's thread, before anything reaches the dispatcher.

Every check raises ``ValueError`` or ``TypeError`` naming the field, so a bad request fails at
``submit`` and never touches the pool. What only the engine can know (the prompt's length in
tokens against the context) is checked in the worker and fails that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpdp.config import ROLES, TO_CONTEXT
from mpdp.engines.base import EngineRequest
from mpdp.wire import protocol

# What a request that generates up to the context (max_tokens="context") is taken to cost: most
# answers end at EOS long before a context of thousands of tokens is full.
_CONTEXT_GUESS = 512


@dataclass(slots=True, frozen=True)
class Completion:
    """One finished request. ``text``/``finish_reason`` are the first choice's; ``choices`` has all n.
    ``cached_tokens``: the prompt tokens the engine found in its prefix cache (vLLM's
    ``num_cached_tokens``); None where the engine does not say (hf, echo)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    worker: int
    choices: list[str]
    finish_reasons: list[str]
    logprobs: list[Any] | None = None     # per choice: one engines.logprobs record a token
    cached_tokens: int | None = None


# The dispatcher makes one Completion per request. A frozen dataclass's __init__ stores each
# field through object.__setattr__ (about 0.1 µs a field); the slots' own descriptors store them
# directly, in half the time. The same object: tests/test_protocol.py compares the two.
_T, _FR, _PT, _CT, _W, _CH, _FRS, _LP, _CC = (Completion.__dict__[f].__set__ for f in Completion.__slots__)


def new_completion(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, worker: int,
                   choices: list[str], finish_reasons: list[str], logprobs: list[Any] | None = None,
                   cached_tokens: int | None = None) -> Completion:
    """``Completion(...)`` with the same arguments, faster (the dispatcher's hot path)."""
    c = object.__new__(Completion)
    _T(c, text)
    _FR(c, finish_reason)
    _PT(c, prompt_tokens)
    _CT(c, completion_tokens)
    _W(c, worker)
    _CH(c, choices)
    _FRS(c, finish_reasons)
    _LP(c, logprobs)
    _CC(c, cached_tokens)
    return c


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
            content = "\n".join(p.get("text", "") for p in content)   # as vLLM's server joins them
        if content is None:
            raise ValueError(f"messages[{i}] has no 'content'")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a string, not {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def check_timeout(timeout: Any) -> None:
    """A request's own ``timeout``: None or a positive number of seconds (every door asks this)."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


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
    max_tokens = req.params.get("max_tokens", 16)
    if max_tokens == TO_CONTEXT:
        max_tokens = _CONTEXT_GUESS
    return 1 + prompt + max_tokens * req.params.get("n", 1)
