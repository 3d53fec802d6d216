"""One typed configuration: sampling parameters and the pool's settings, validated once.

``SamplingParams`` (vLLM's ``SamplingParams`` names) and ``PoolConfig`` are slotted records
that check every field when built (``ValueError``/``TypeError`` naming it) and round-trip
through JSON, so that the library, the command line, the server, batch jobs, DSPy and
launchers on other machines all build and pass the same thing. Nothing here imports an engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_TOKENS_LIMIT = 1 << 20          # beyond any context window: a typo, not a request
MAX_N = 128


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
    return _plain("response_format", v)


def _dict(name):
    def check(v):
        if v is not None and not isinstance(v, dict):
            raise TypeError(f"{name} must be a dict, not {type(v).__name__}")
        return _plain(name, v)
    return check


def _plain(name: str, v: Any, depth: int = 0) -> Any:
    """Plain JSON-like data only: a map key that is not a string (``{(1, 2): 3}``) would pack
    but not unpack in the worker, and take the whole micro-batch with it."""
    if depth > 32:
        raise ValueError(f"{name} is nested too deeply")
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} keys must be strings, not {type(k).__name__} ({k!r})")
            _plain(name, item, depth + 1)
    elif isinstance(v, (list, tuple)):
        for item in v:
            _plain(name, item, depth + 1)
    return v


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


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Validated sampling fields; None means "the engine's default". ``to_dict`` is the wire form."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    ignore_eos: bool | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None

    def __post_init__(self):
        for key, value in check_sampling(self.to_dict()).items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "SamplingParams":
        return cls(**check_sampling(params))

    def to_dict(self) -> dict[str, Any]:
        return {f: v for f in self.__slots__ if (v := getattr(self, f)) is not None}

    def merged(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """This record's fields with validated ``overrides`` on top, as the wire's params dict."""
        out = self.to_dict()
        out.update(check_sampling(overrides))
        return out


def _positive(name: str, v: Any, *, integer: bool = False, allow_none: bool = False, zero: bool = False):
    if v is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, not {type(v).__name__} ({v!r})")
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {v!r}")


LAUNCHERS = ("local", "ray")


@dataclass(slots=True)
class PoolConfig:
    """Everything ``mpdp.Pool`` is built from. Engine-dependent defaults (timeouts) stay None
    here and are filled in from the engine's own facts when the pool starts."""

    model: str = "smollm2-135m-instruct"
    engine: str | None = None                 # None: vllm with a GPU, else hf
    num_workers: int | None = None
    num_gpus: int | None = None
    tensor_parallel_size: int = 1
    engine_options: dict = field(default_factory=dict)
    gpus: list[int] | None = None
    routing: str = "cache_aware"             # measured never worse than least_loaded (bench/RESULTS.md)
    max_batch: int = 512                      # requests per micro-batch frame
    max_pending: int = 100_000
    max_crashes: int = 2
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float | None = None    # no heartbeat this long: the process is frozen or gone
    step_timeout: float | None = None         # one engine call this long: the engine is hung
    ready_timeout: float | None = None
    shutdown_timeout: float = 30.0
    dispatcher_timeout: float = 30.0          # a worker that hears nothing for this long exits
    transport: str = "ipc"
    transport_host: str = "127.0.0.1"
    transport_port: int = 0
    worker_logs: str = "file"
    worker_env: dict = field(default_factory=dict)
    launcher: str = "local"
    ray_address: str | None = None
    wait_ready: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = SamplingParams.from_dict(self.sampling)
        elif not isinstance(self.sampling, SamplingParams):     # None would fail far away, at first use
            raise TypeError(f"sampling must be a dict of sampling parameters or a SamplingParams, "
                            f"not {type(self.sampling).__name__}")
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a non-empty string, not {self.model!r}")
        if self.engine is not None and not isinstance(self.engine, str):
            raise TypeError(f"engine must be a string, not {type(self.engine).__name__}")
        for name in ("num_workers", "num_gpus"):
            v = getattr(self, name)
            if v is not None:
                _positive(name, v, integer=True)
        _positive("tensor_parallel_size", self.tensor_parallel_size, integer=True)
        _positive("max_batch", self.max_batch, integer=True)
        _positive("max_pending", self.max_pending, integer=True)
        _positive("max_crashes", self.max_crashes, integer=True)
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("heartbeat_timeout", self.heartbeat_timeout, allow_none=True)
        _positive("step_timeout", self.step_timeout, allow_none=True)
        _positive("ready_timeout", self.ready_timeout, allow_none=True)
        _positive("shutdown_timeout", self.shutdown_timeout, zero=True)
        _positive("dispatcher_timeout", self.dispatcher_timeout)
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(f"heartbeat_timeout ({self.heartbeat_timeout}) must be more than twice "
                             f"heartbeat_interval ({self.heartbeat_interval}), or idle workers look hung")
        if self.dispatcher_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(f"dispatcher_timeout ({self.dispatcher_timeout}) must be more than twice "
                             f"heartbeat_interval ({self.heartbeat_interval})")
        if not isinstance(self.engine_options, dict):
            raise TypeError(f"engine_options must be a dict, not {type(self.engine_options).__name__}")
        if self.gpus is not None and (not isinstance(self.gpus, (list, tuple)) or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in self.gpus)):
            raise TypeError(f"gpus must be a list of GPU indices, not {self.gpus!r}")
        if self.worker_logs not in ("file", "inherit"):
            raise ValueError("worker_logs must be 'file' (kept for error reports) or 'inherit'")
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, not {self.launcher!r}")
        if not isinstance(self.worker_env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.worker_env.items()):
            raise TypeError("worker_env must map strings to strings")
        if not isinstance(self.wait_ready, bool):
            raise TypeError(f"wait_ready must be a bool, not {type(self.wait_ready).__name__}")
        _plain("engine_options", self.engine_options)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sampling"] = self.sampling.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a pool config must be a dict (a JSON object), not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"unknown pool settings {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "PoolConfig":
        try:
            d = json.loads(text)
        except RecursionError:         # json's parser recurses per level: say where, not "maximum depth"
            raise ValueError(f"{_deep_field(text)} is nested too deeply") from None
        return cls.from_dict(d)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{}]')


def _deep_field(text: str, limit: int = 64) -> str:
    """The top-level field of a JSON object under which ``text`` nests deeper than ``limit``."""
    depth, key = 0, None
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return "the pool config" if key is None else repr(json.loads(key))
        elif token in "]}":
            depth -= 1
        elif depth == 1 and m.group(1):             # a key of the top-level object
            key = token[:m.start(1) - m.start()]
    return "the pool config"
