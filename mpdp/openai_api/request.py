"""An OpenAI request body -> pool calls, with every rule about its fields written once.

A body field is one of: a sampling field of the pool (``config.SAMPLING``, checked here with
the pool's own checks, so a bad value is refused before any pool or worker is involved); a
field handled here (``model``, ``messages``/``prompt``, ``stream``, ``stream_options``,
``logprobs``/``top_logprobs``, ``max_completion_tokens``); a field that changes nothing
(``user``, ``metadata``, ...); or a field mpdp does not serve (``tools``, ``logit_bias``,
``priority``, vLLM's ``min_p`` ...). The last kind is refused naming it when it asks for
something (a value other than its default), so a request that asks for tools is never
answered as if it had not; a field nobody knows is refused whatever its value (``0`` too), as a
typo would otherwise be silently ignored.

The rules hold for every door; a door says only what its medium forbids: a batch file cannot
stream (``streaming=False``). Mistakes raise ``errors.InvalidRequest`` (kind ``INVALID``, or
``NOT_FOUND`` for a model not served) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpdp.config import SAMPLING, check_sampling
from mpdp.errors import NOT_FOUND, InvalidRequest, param_of

CHAT, COMPLETION = "chat", "completion"
MAX_PROMPTS = 1024               # prompts in one /v1/completions request (each is one pool request)

# Body fields passed to the pool under the same name: the pool's sampling fields, less those that
# OpenAI spells its own way (handled below) and chat_template_kwargs, which only chat takes.
_SAMPLING = frozenset(SAMPLING) - {"max_tokens", "logprobs", "chat_template_kwargs"}
_CHAT_SAMPLING = _SAMPLING | {"chat_template_kwargs"}
# Fields that change nothing for mpdp, whatever their value.
_IGNORED = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls", "request_id"})
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
    "priority": (None, 0),       # vLLM's priority scheduling: mpdp's scheduler has no priorities
}


def bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param)


@dataclass(slots=True)
class Parsed:
    """One request, as pool calls: ``inputs`` are the prompt keywords of each pool request
    (one for chat, one per prompt for completions), ``sampling`` their shared sampling keywords."""

    kind: str
    model: str
    inputs: list[dict[str, Any]]
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False    # usage on every chunk (vLLM's continuous_usage_stats)
    logprobs: bool = False            # the response carries logprobs
    top_logprobs: int = 0
    renames: dict[str, str] = field(default_factory=dict)   # pool field -> the client's name for it

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)

    def pool_calls(self) -> list[dict[str, Any]]:
        """The keywords of each pool request (``Pool.submit(**call)``), in order."""
        return [{**inp, **self.sampling} for inp in self.inputs]


def parse(body: Any, kind: str, served: list[str], *, streaming: bool = True) -> Parsed:
    """A request body -> ``Parsed``; InvalidRequest for what is wrong before the engine sees it.
    ``served``: the model names this door answers to (the first is the default).
    ``streaming``: False where the medium cannot stream (a batch file)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {json_type(body)}")
    body = dict(body)
    model = _model(body.pop("model", None), served)
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
        if "prompt_token_ids" in inputs[0]:
            renames["prompt_token_ids"] = "prompt"     # token ids come in the client's prompt
        names = _SAMPLING
        if body.get("max_tokens") is not None:
            sampling["max_tokens"] = body.pop("max_tokens")
        body.pop("max_tokens", None)
    stream = body.pop("stream", None)
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, not {json_type(stream)}", "stream")
    if stream and not streaming:
        raise bad("stream: a batch file cannot stream (each result is one whole line); "
                  "leave stream out or false", "stream")
    include_usage, continuous = _stream_options(body.pop("stream_options", None), bool(stream))
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
            raise bad(f"unknown field {printable(repr(key))}", printable(key))
    if refused:
        raise bad(f"{', '.join(refused)}: not supported by mpdp", refused[0])
    try:
        check_sampling(sampling)     # the pool's own checks, so every door refuses the same values
    except (ValueError, TypeError) as exc:
        raise bad(str(exc), param_of(str(exc), renames)) from None
    return Parsed(kind, model, inputs, sampling, bool(stream), include_usage, include_usage and continuous,
                  logprobs, top, renames)


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8: a lone surrogate (valid in JSON text, not in UTF-8) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _model(model: Any, served: list[str]) -> str:
    if model is None:
        return served[0]                       # as vLLM's server: the model is optional
    if not isinstance(model, str):
        raise bad(f"model must be a string, not {json_type(model)}", "model")
    if model not in served:
        raise InvalidRequest(f"The model `{printable(model)}` does not exist; mpdp serves "
                             f"{', '.join(served)}", "model", NOT_FOUND)
    return model


def _is_default(value: Any, defaults: tuple) -> bool:
    # True == 1 in Python: a boolean matches only a boolean default.
    return any(value is None if d is None else (value == d and isinstance(value, bool) == isinstance(d, bool))
               for d in defaults)


def json_type(v: Any) -> str:
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
        return [{"prompt_token_ids": _token_ids(prompt)}]
    if len(prompt) > MAX_PROMPTS:
        raise bad(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
        return [{"prompt_token_ids": _token_ids(p)} for p in prompt]
    raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
              "(not a mixture)", "prompt")


def _token_ids(ids: list[int]) -> list[int]:
    # Refused here, naming the client's field, by every door (a batch line too, before any worker).
    if any(t < 0 for t in ids):
        raise bad("prompt: token ids must be non-negative", "prompt")
    return ids


def _stream_options(options: Any, stream: bool) -> tuple[bool, bool]:
    if options is None:
        return False, False
    if not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise bad(f"stream_options must be an object, not {json_type(options)}", "stream_options")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise bad(f"unknown stream_options field(s): {printable(', '.join(sorted(unknown)))}", "stream_options")
    flags = []
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise bad(f"stream_options.{name} must be a boolean", "stream_options")
        flags.append(value)
    return flags[0], flags[1]


def _logprobs(body: dict, kind: str, sampling: dict) -> tuple[bool, int]:
    """Chat: ``logprobs`` (bool) and ``top_logprobs`` (0..20); completions: ``logprobs`` (an int,
    the number of alternatives). The pool's ``logprobs`` is the number of alternatives."""
    value = body.pop("logprobs", None)
    top = body.pop("top_logprobs", None) if kind == CHAT else None
    if kind == COMPLETION:
        if value is None:
            return False, 0
        sampling["logprobs"] = value          # checked with the other sampling fields (an int in 0..20)
        return True, value if isinstance(value, int) else 0
    if value is not None and not isinstance(value, bool):
        raise bad(f"logprobs must be a boolean, not {json_type(value)}", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise bad(f"top_logprobs must be an integer between 0 and 20, got {top!r}", "top_logprobs")
        if not value:
            raise bad("top_logprobs needs logprobs to be true", "top_logprobs")
    if not value:
        return False, 0
    sampling["logprobs"] = top or 0
    return True, top or 0
