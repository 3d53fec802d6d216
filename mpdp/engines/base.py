"""The engine interface: what a worker process drives, step by step.

A worker owns exactly one engine and runs this loop (see ``mpdp/worker.py``)::

    while running:
        for req in new requests from the dispatcher:
            engine.add(req)          # any exception -> that request fails alone
        if engine.has_unfinished():
            for result in engine.step():   # finished requests, and partial ones that stream
                send result back at once

``step()`` should be short (one decoding step, or a few milliseconds of work): the worker
takes new micro-batches between steps, so new requests join the running batch while it
generates. A long step is slow, not hung: the worker's heartbeats come from a thread of their
own and keep coming while the engine computes (``mpdp/worker/beat.py``). What counts as hung
is one engine call (``add``, ``step`` or ``abort``) running past the engine's ``step_timeout``:
the worker is then killed and restarted, and its requests retried. Engines never touch sockets.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mpdp.config import SAMPLING


@dataclass(slots=True)
class EngineRequest:
    """One request as the engine sees it. Exactly one of prompt / messages / prompt_token_ids is set.

    ``params`` holds validated sampling fields named as vLLM's ``SamplingParams``
    (max_tokens, temperature, top_p, top_k, n, stop, seed, presence_penalty,
    frequency_penalty, logprobs, ignore_eos) plus ``response_format`` and
    ``chat_template_kwargs`` where given. Absent keys mean "engine default".
    ``stream``: the caller wants the text as it is decoded (partial results, see EngineResult).
    ``continuation``: a streamed request sent again after its worker died (``core/resume.py``),
    per choice ``[token ids already generated, characters of their text already delivered]``.
    The engine takes the ids as that choice's first generated tokens (after the prompt, counted
    in max_tokens, seen by stop strings and penalties), decodes what follows in their context and
    streams only text past the delivered characters; the final result carries whole texts.
    """

    id: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    continuation: list[list] | None = None


@dataclass(slots=True)
class EngineResult:
    """A request's outcome. ``error_type``/``error`` set means it failed (alone).

    ``error_type`` is a name from ``mpdp.errors.ERROR_NAMES`` ("ValueError", "TypeError",
    "ContextWindowExceeded", "EngineError"); ``traceback`` the remote one, kept as the cause.

    ``finished=False`` marks a partial result of a streamed request: ``texts`` then holds only
    the text decoded since the last partial (per choice, "" where a choice has nothing new),
    and the counts so far. The final result (``finished=True``) always carries the whole texts,
    so a consumer that missed a partial still ends with the truth. A partial also carries, per
    choice, the ids of the tokens generated since the last partial (``token_ids``), whether or not
    their text is out yet: what a stream's continuation starts from if its worker dies.
    """

    id: int
    texts: list[str] = field(default_factory=list)          # one per choice (n)
    finish_reasons: list[str] = field(default_factory=list)  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0                                # summed over choices
    logprobs: list[Any] | None = None      # per choice, when asked: engines.logprobs records
    error_type: str | None = None
    error: str | None = None
    finished: bool = True
    traceback: str | None = None
    cached_tokens: int | None = None                          # prompt tokens the engine's cache held
    token_ids: list[list[int]] | None = None                  # partials: new token ids per choice

    @classmethod
    def failure(cls, request_id: int, exc: BaseException) -> "EngineResult":
        """A failed request. The message is the exception's own text: the pool raises it as the
        exception class its name maps to, so the class name is not repeated inside it."""
        import traceback as tb

        if isinstance(exc, ContextWindowExceeded):
            kind = exc.error_type
        elif isinstance(exc, (ValueError, TypeError)):
            kind = "TypeError" if isinstance(exc, TypeError) else "ValueError"
        else:
            kind = "EngineError"
        message = str(exc) if kind != "EngineError" else f"{type(exc).__name__}: {exc}"
        trace = "".join(tb.format_exception(exc)) if exc.__traceback__ is not None else None
        return cls(id=request_id, error_type=kind, error=message, traceback=trace)


def json_format(response_format: Any) -> tuple[str, Any] | None:
    """An OpenAI ``response_format`` read once for every engine: None for plain text, else
    ("json_object", None) or ("json_schema", the schema as a dict or JSON text). ValueError
    names what is wrong, so that every engine refuses the same things the same way."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be a dict, not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return kind, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, str)):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return kind, schema
    raise ValueError(f"unsupported response_format type {kind!r}; use 'text', 'json_object' or 'json_schema'")


class ContextWindowExceeded(ValueError):
    """Raised by an engine's ``add`` when the prompt does not fit the model's context."""

    error_type = "ContextWindowExceeded"


@dataclass(slots=True)
class WorkerPlacement:
    """Where a worker runs: its index, its GPUs (already visible as 0..k-1) and its CPU share."""

    index: int
    gpus: list[int] = field(default_factory=list)   # physical ids, for reporting only
    num_threads: int = 1                            # CPU threads this worker may use


class Engine(abc.ABC):
    """One model instance inside one worker process.

    The class attributes are the engine's facts, read by the pool in the parent process
    (without building an engine): where it runs, how long it may take, what it accepts.
    """

    name: ClassVar[str]
    # True: the model argument names weights, resolved once in the parent to a local folder
    # (mpdp.models.resolve_model: the embedded default is converted there, never in N workers).
    loads_weights: ClassVar[bool] = False
    uses_gpu: ClassVar[bool] = False            # workers are placed on GPUs (num_gpus, gpus=)
    ready_timeout: ClassVar[float] = 60.0       # default seconds to become READY
    # Default silence after which a worker's process counts as frozen or gone. Heartbeats come
    # from their own thread, so this is about the process (SIGSTOP, swapped out), never a slow step.
    heartbeat_timeout: ClassVar[float] = 10.0
    # Default seconds one engine call (add, step, abort) may run before the engine counts as
    # hung: generous, many times the longest step the engine plans on a loaded machine. An
    # engine may set it per instance (from its model's size); READY carries it to the pool;
    # the pool's step_timeout= overrides it.
    step_timeout: float = 120.0
    # Takes EngineRequest.continuation (and reports token_ids in partials): a stream whose worker
    # dies continues on another. Otherwise such a stream ends with StreamInterrupted.
    continues_streams: ClassVar[bool] = False
    # What PoolConfig.batch_limit="auto" means for it: "adaptive" only where it measured a gain.
    batch_limit_default: ClassVar[str] = "off"
    # The sampling keywords it honours (a subset of mpdp.config.SAMPLING); any other is refused
    # at submit, naming the engine.
    sampling_fields: ClassVar[frozenset[str]] = frozenset(SAMPLING)
    # The engine options it takes; None: not known in the parent (the engine checks them itself).
    option_names: ClassVar[frozenset[str] | None] = None

    @classmethod
    def known_options(cls) -> frozenset[str] | None:
        """The option names this engine takes, found without importing its packages."""
        return cls.option_names

    @classmethod
    def cannot_continue(cls, params: dict[str, Any]) -> str | None:
        """Why a stream with these sampling params cannot continue on this engine (None: it can).
        Asked only where ``continues_streams`` is set."""
        return None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """ValueError naming the options this engine does not take, before any worker starts."""
        known = cls.known_options()
        unknown = sorted(set(options) - known) if known is not None else []
        if unknown:
            raise ValueError(f"unknown {cls.name} engine option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")

    def __init__(self, model: str, options: dict[str, Any], placement: WorkerPlacement):
        self.model = model
        self.options = dict(options)
        self.placement = placement

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """How many requests this engine wants to hold at once (the credit the worker advertises)."""

    @property
    def max_model_len(self) -> int | None:
        """The context length, when known (reported to the pool in READY)."""
        return None

    @abc.abstractmethod
    def add(self, request: EngineRequest) -> None:
        """Accept a request. Raise ValueError/TypeError/ContextWindowExceeded for bad input (the
        caller sees that class); any other exception fails the request alone as an EngineError."""

    @abc.abstractmethod
    def step(self) -> list[EngineResult]:
        """Advance all held requests a little; return the ones that finished (or failed)."""

    @abc.abstractmethod
    def abort(self, request_ids: list[int]) -> None:
        """Drop these requests if still held; never report them afterwards."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """True while any accepted request has not been returned by ``step``."""

    def step_counts(self) -> tuple[int, int] | None:
        """(sequences that ran, output tokens made) in the last ``step``, for the pool's batch
        limit (``mpdp/routing/batch_limit.py``); None where the engine does not count them."""
        return None

    def close(self) -> None:
        """Free the model (GPU memory). Called once when the worker exits cleanly."""
