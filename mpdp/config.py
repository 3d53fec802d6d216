"""One typed configuration: sampling parameters and the pool's settings, validated once.

``SamplingParams`` (vLLM's ``SamplingParams`` names; ``SAMPLING`` is the one list of them, each
with its check) and ``PoolConfig`` are slotted records that check every field when built
(``ValueError``/``TypeError`` naming it) and round-trip through JSON. ``PoolConfig`` is the only
record of a pool's settings, and every front door builds one::

    mpdp.Pool(**settings) / Pool(config=)    PoolConfig(...)
    mpdp generate, mpdp serve                PoolConfig.add_cli_args(group) / from_cli_args(args)
    mpdp.dspy.LM, PoolLM, vLLMOffline*       PoolConfig fields as keywords, or config=
    saved DSPy programs, pickles, JSON       to_dict() / from_dict(), to_json() / from_json()

Each field declares its command-line form (``Flag``), so both subcommands get every pool flag
from here, and a keyword is a pool setting exactly when it names a field (``POOL_FIELDS``); any
other is a sampling keyword, checked against ``SAMPLING``. Nothing here imports an engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

DEFAULT_MODEL = "smollm2-135m-instruct"   # the embedded model (mpdp.models): runs with no download
# max_tokens="context": generate until the context is full (max_model_len minus the prompt), as
# vLLM's SamplingParams(max_tokens=None) and an OpenAI chat request without max_tokens do. None
# keeps meaning "the engine's default" (16), as everywhere else here.
TO_CONTEXT = "context"

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


def _max_tokens(v):
    if v == TO_CONTEXT:
        return v
    return _int("max_tokens", v, 1, MAX_TOKENS_LIMIT)


# The sampling keywords (vLLM SamplingParams names) and how each is checked: the one list of them.
# Engines declare the subset they serve (Engine.sampling_fields); SamplingParams has these fields.
SAMPLING = {
    "max_tokens": _max_tokens,
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

    max_tokens: int | str | None = None      # an int, or TO_CONTEXT
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


if SamplingParams.__slots__ != tuple(SAMPLING):       # one list: the record is built from the same names
    raise AssertionError("SamplingParams' fields must be SAMPLING's keys, in order")


def _positive(name: str, v: Any, *, integer: bool = False, allow_none: bool = False, zero: bool = False):
    if v is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, not {type(v).__name__} ({v!r})")
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {v!r}")


LAUNCHERS = ("local", "ray")
BATCH_LIMIT_MODES = ("auto", "adaptive", "off")


def check_batch_limit(value: Any) -> str | int:
    """``batch_limit``: "auto" (the engine's default), "adaptive", "off" or a positive int."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (
            isinstance(value, str) and value not in BATCH_LIMIT_MODES):
        raise ValueError(f"batch_limit must be 'auto', 'adaptive', 'off' or a positive int, not {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"batch_limit must be >= 1, got {value}")
    return value


def _batch_limit_arg(text: str) -> str | int:
    try:
        return check_batch_limit(int(text) if text.strip().isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ─── Command-line forms ──────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Flag:
    """How a ``PoolConfig`` field is given on the command line. ``type`` turns the text into the
    value (its ValueError/ArgumentTypeError is argparse's one-line usage error); ``choices`` may be
    a callable, so that listing engines or routing policies waits until a parser is built;
    ``pairs``: a repeatable ``KEY=VALUE`` flag collected into a dict (``json``: VALUE read as JSON)."""

    help: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None
    pairs: bool = False
    json: bool = False
    name: str | None = None          # the flag, when not --field-name


def _setting(default: Any = dataclasses.MISSING, flag: Flag | None = None, *, factory=dataclasses.MISSING):
    return field(default=default, default_factory=factory, metadata={"flag": flag})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _seconds_or_zero(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 picks a free one), got {value}")
    return value


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants GPU indices like 0,1,3, got {text!r}") from None
    if not gpus or min(gpus) < 0:
        raise argparse.ArgumentTypeError(f"wants GPU indices like 0,1,3, got {text!r}")
    return gpus


def parse_pair(text: str, as_json: bool = True) -> tuple[str, Any]:
    """``KEY=VALUE``; with ``as_json`` the value is JSON where it parses (a bare string where it
    does not, e.g. dtype=float16). ValueError when there is no ``KEY=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"wants KEY=VALUE, got {text!r}")
    if not as_json:
        return key, value
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _engines() -> list[str]:
    from mpdp.engines import ENGINES          # a dict of names: imports no engine

    return sorted(ENGINES)


def _policies() -> list[str]:
    from mpdp.routing import POLICIES

    return sorted(POLICIES)


@dataclass(slots=True)
class PoolConfig:
    """Everything ``mpdp.Pool`` is built from. Engine-dependent defaults (timeouts) stay None
    here and are filled in from the engine's own facts when the pool starts."""

    model: str = _setting(DEFAULT_MODEL, Flag("model name or local folder"))
    engine: str | None = _setting(None, Flag("engine (default: vllm when installed and a GPU is visible, "
                                             "else hf)", choices=_engines))
    num_workers: int | None = _setting(None, Flag("CPU workers for the hf/echo engines (default: the CPU "
                                                  "count, at most 4)", "N", positive_int))
    num_gpus: int | None = _setting(None, Flag("GPUs for the vllm engine (default: every visible GPU)", "N",
                                               positive_int))
    tensor_parallel_size: int = _setting(1, Flag("GPUs per worker", "N", positive_int))
    engine_options: dict = _setting(flag=Flag("engine option, e.g. max_model_len=4096 (repeatable; the "
                                              "engine's list is checked before any worker starts)",
                                              "KEY=JSON", pairs=True, json=True, name="--engine-option"),
                                    factory=dict)
    gpus: list[int] | None = _setting(None, Flag("which visible GPUs to use, e.g. 0,1 (default: the first "
                                                 "--num-gpus)", "I,J,...", _gpu_list))
    # cache_aware: measured never worse than least_loaded (bench/RESULTS.md)
    routing: str = _setting("cache_aware", Flag("how requests are placed on workers", choices=_policies))
    # the policy's keywords; events=true makes cache_aware route by vLLM's KV-cache events (opt-in),
    # sticky (with events; default true) keeps each prefix going where the pool sent it
    routing_options: dict = _setting(flag=Flag("routing policy option, e.g. events=true (cache_aware: "
                                                "route by vLLM's KV-cache events; sticky=false: by them "
                                                "alone; repeatable)", "KEY=JSON",
                                                pairs=True, json=True, name="--routing-option"),
                                     factory=dict)
    max_batch: int = _setting(512, Flag("requests per micro-batch frame", "N", positive_int))
    # requests each engine holds; the rest wait in the pool's queue (mpdp/core/batch_limits.py)
    batch_limit: str | int = _setting("auto", Flag("requests each engine holds: auto (the engine's default: "
                                                   "adaptive for vllm, else off), adaptive, off (what the "
                                                   "engine advertises) or a number", "auto|adaptive|off|N",
                                                   _batch_limit_arg))
    max_pending: int = _setting(100_000, Flag("requests the pool holds at once; more wait for room", "N",
                                              positive_int))
    max_crashes: int = _setting(2, Flag("worker crashes a request may take part in before it fails", "N",
                                        positive_int))
    heartbeat_interval: float = _setting(0.5, Flag("seconds between heartbeats", "SECONDS", positive_seconds))
    heartbeat_timeout: float | None = _setting(None, Flag("silence after which a worker is hung (default: "
                                                          "the engine's)", "SECONDS", positive_seconds))
    # one engine call (add, step, abort) this long: the engine is hung
    step_timeout: float | None = _setting(None, Flag("one engine call this long means a hung engine "
                                                     "(default: the engine's)", "SECONDS", positive_seconds))
    ready_timeout: float | None = _setting(None, Flag("how long a worker may take to load (default: the "
                                                      "engine's)", "SECONDS", positive_seconds))
    shutdown_timeout: float = _setting(30.0, Flag("how long closing waits for workers to exit", "SECONDS",
                                                  _seconds_or_zero))
    # a worker that hears nothing from the dispatcher for this long exits
    dispatcher_timeout: float = _setting(30.0, Flag("a worker that hears nothing for this long exits",
                                                    "SECONDS", positive_seconds))
    transport: str = _setting("ipc", Flag("how workers connect on this machine", choices=("ipc", "tcp")))
    transport_host: str = _setting("127.0.0.1", Flag("the address tcp workers connect to", "HOST"))
    transport_port: int = _setting(0, Flag("the tcp port (0: a free one)", "PORT", _port))
    worker_logs: str = _setting("file", Flag("workers' output: kept in a file for error reports, or "
                                             "inherited", choices=("file", "inherit")))
    worker_env: dict = _setting(flag=Flag("environment variable for the workers (repeatable)", "KEY=VALUE",
                                          pairs=True), factory=dict)
    launcher: str = _setting("local", Flag("where workers run: this machine, or a Ray cluster",
                                           choices=LAUNCHERS))
    ray_address: str | None = _setting(None, Flag("the Ray cluster for --launcher ray, e.g. HEAD_IP:6379 "
                                                  "(default: RAY_ADDRESS, else a running local cluster)",
                                                  "ADDRESS"))
    wait_ready: bool = _setting(True)          # each door decides (serve answers /health while loading)
    sampling: SamplingParams = _setting(flag=None, factory=SamplingParams)   # flags: per door (cli_args)

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
        check_batch_limit(self.batch_limit)
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
        if not isinstance(self.routing_options, dict):
            raise TypeError(f"routing_options must be a dict, not {type(self.routing_options).__name__}")
        _plain("routing_options", self.routing_options)
        if self.routing_options:                   # checked here, before any worker starts
            from mpdp.routing import make_policy

            make_policy(self.routing, self.routing_options)

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

    # -- the command line (as vLLM's EngineArgs.add_cli_args / from_cli_args) -----------------------
    @classmethod
    def add_cli_args(cls, group) -> None:
        """Every field with a ``Flag`` as an option of ``group`` (a parser or an argument group),
        under the field's name as ``dest``; defaults are the fields' own."""
        for f, flag in _flagged():
            name = flag.name or "--" + f.name.replace("_", "-")
            if flag.pairs:
                group.add_argument(name, dest=f.name, action="append", default=[], metavar=flag.metavar,
                                   type=_pair_type(flag.json), help=flag.help)
                continue
            choices = flag.choices() if callable(flag.choices) else flag.choices
            default = f.default
            shown = " (default: %(default)s)" if default is not None and "(default:" not in flag.help else ""
            group.add_argument(name, dest=f.name, default=default, type=flag.type, choices=choices,
                               metavar=flag.metavar, help=flag.help + shown)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "PoolConfig":
        """The config the flags of ``add_cli_args`` name; ``overrides`` (e.g. ``wait_ready``,
        ``sampling``) on top. ValueError/TypeError name the field, as the constructor's do."""
        values = {}
        for f, flag in _flagged():
            if hasattr(args, f.name):
                value = getattr(args, f.name)
                values[f.name] = dict(value) if flag.pairs else value
        values.update(overrides)
        return cls(**values)

    @staticmethod
    def cli_flags() -> list[str]:
        """The pool's flags, as ``--help`` lists them."""
        return [flag.name or "--" + f.name.replace("_", "-") for f, flag in _flagged()]


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


POOL_FIELDS = frozenset(f.name for f in dataclasses.fields(PoolConfig))


def _flagged():
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(PoolConfig) if f.metadata.get("flag")]


def _pair_type(as_json: bool):
    def parse(text: str):
        try:
            return parse_pair(text, as_json)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def split_settings(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pool settings, the rest) of a front door's keywords: a keyword is a pool setting exactly
    when it names a PoolConfig field; the rest are sampling keywords (or the door's own)."""
    pool = {k: v for k, v in kwargs.items() if k in POOL_FIELDS}
    return pool, {k: v for k, v in kwargs.items() if k not in POOL_FIELDS}


def config_with(config: "PoolConfig | None", settings: dict[str, Any], sampling: dict[str, Any]) -> "PoolConfig":
    """A door's PoolConfig: ``config`` (or the defaults) with ``settings`` and pool-level
    ``sampling`` defaults on top; unknown sampling keywords are a TypeError naming them."""
    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise TypeError(f"unknown sampling keyword {unknown[0]!r}, and no pool setting either; sampling: "
                        f"{', '.join(SAMPLING)}; pool settings: {', '.join(sorted(POOL_FIELDS))}")
    base = config if config is not None else PoolConfig()
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(PoolConfig)}
    for name in ("engine_options", "worker_env", "routing_options"):
        values[name] = dict(values[name])
    values.update(settings)
    merged = values["sampling"]
    merged = merged.to_dict() if isinstance(merged, SamplingParams) else dict(merged or {})
    merged.update(sampling)
    values["sampling"] = SamplingParams.from_dict({k: v for k, v in merged.items() if v is not None})
    return PoolConfig(**values)
