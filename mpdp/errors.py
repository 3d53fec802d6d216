"""The errors a caller of mpdp can see. Each keeps its cause (remote traceback, exit code, signal).

``classify(exc)`` is the one reading of an exception for every entry point: a ``Failure``
(kind, message, param). Each door maps the kind with a small table of its own: the OpenAI
layer to HTTP statuses (the server, and the status codes of batch-file lines), DSPy to its
error classes.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass


class MpdpError(Exception):
    """Base class of every error raised by mpdp itself."""


class PoolClosed(MpdpError, RuntimeError):
    """submit() after close(), or a pending request failed because the pool was closed."""


class PoolBroken(MpdpError, RuntimeError):
    """The pool cannot serve any more (no worker can be started)."""


class WorkerStartError(PoolBroken):
    """A worker did not become READY in time, or exited while starting. Says which and why."""


class WorkerCrashed(MpdpError, RuntimeError):
    """A request was in flight on workers that died ``attempts`` times; it is failed, the pool goes on."""

    def __init__(self, message: str, *, worker: int | None = None, exitcode: int | None = None,
                 stderr_tail: str = "", attempts: int = 0):
        super().__init__(message)
        self.worker = worker
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        self.attempts = attempts


class StreamInterrupted(WorkerCrashed):
    """A streamed request's worker died after part of its text was delivered, and the stream
    cannot continue from there (its engine cannot, or it asked for logprobs): it ends here rather
    than start again and show its consumer text twice."""


class StreamConsumerFailed(MpdpError, RuntimeError):
    """A stream's consumer failed to take its text (its event loop closed, its sink raised): the
    request was aborted in its engine; the pool and every other request go on."""


class RequestTimeout(MpdpError, TimeoutError):
    """The request's own ``timeout`` passed; it was aborted inside the engine."""


class EngineError(MpdpError, RuntimeError):
    """The engine failed this request (the remote traceback is in the message)."""


class ContextWindowExceededError(MpdpError, ValueError):
    """The prompt (plus max_tokens, where the engine checks it) does not fit the model's context."""


class InvalidRequest(MpdpError, ValueError):
    """A request a front door refuses before the pool sees it (its shape, a field nobody knows, a
    field mpdp does not serve). ``param`` names the field; ``kind`` is INVALID or NOT_FOUND."""

    def __init__(self, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.param = param
        self.kind = kind or INVALID


class ProtocolError(MpdpError):
    """A frame that does not follow the protocol (wrong version, unknown tag, oversized, undecodable)."""


def describe_exit(exitcode: int | None) -> str:
    """'exit code 1' or 'signal SIGKILL' from a multiprocessing exitcode."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"signal {_signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class RemoteTraceback(Exception):
    """The traceback of an error raised inside a worker, kept as ``__cause__`` (as CPython's
    process pool does with ``_RemoteTraceback``)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


# The one table of error names that travel on the wire (EngineResult.error_type) and the
# exception each becomes in the caller. An unknown name is an EngineError.
ERROR_NAMES: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "ContextWindowExceeded": ContextWindowExceededError,
    "EngineError": EngineError,
}


def error_from_wire(name: str, message: str, traceback: str | None = None) -> Exception:
    exc = ERROR_NAMES.get(name, EngineError)(message)
    if traceback:
        exc.__cause__ = RemoteTraceback(traceback)
    return exc


# -- one classifier --------------------------------------------------------------------------------
INVALID = "invalid_request"      # the caller's mistake: a value, the request's shape, an unknown field
NOT_FOUND = "not_found"          # a model this door does not serve
CONTEXT = "context_length"       # the prompt (plus max_tokens) does not fit the model
UNAVAILABLE = "unavailable"      # the pool is closed or broken: no request can be served
TIMEOUT = "timeout"              # the request's own timeout passed
ENGINE = "engine"                # the engine or its worker failed this request (ours)
INTERNAL = "internal"            # anything else (ours)
KINDS = (INVALID, NOT_FOUND, CONTEXT, UNAVAILABLE, TIMEOUT, ENGINE, INTERNAL)

# Request fields a ValueError/TypeError message may start with ("temperature must be >= 0"),
# reported as the failure's ``param``. Request fields only: a pool setting is not a request's.
_REQUEST_FIELDS = frozenset({"prompt", "messages", "prompt_token_ids", "timeout", "model", "stream",
                             "stream_options", "max_completion_tokens", "top_logprobs"})


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str                    # one of KINDS
    message: str                 # for the user: no exception class name in front of it
    param: str | None = None     # the request field it names, when it names one

    @property
    def ours(self) -> bool:
        """The pool's (or the server's) fault, not the caller's."""
        return self.kind in (ENGINE, INTERNAL, UNAVAILABLE, TIMEOUT)


def classify(exc: BaseException, renames: dict[str, str] | None = None) -> Failure:
    """What went wrong, once for every door. ``renames`` maps a pool field to the caller's name
    for it (an OpenAI body's ``max_completion_tokens`` reaches the pool as ``max_tokens``)."""
    if isinstance(exc, InvalidRequest):
        return Failure(exc.kind, str(exc), exc.param)
    if isinstance(exc, ContextWindowExceededError):
        return Failure(CONTEXT, str(exc))
    if isinstance(exc, (PoolClosed, PoolBroken)):
        return Failure(UNAVAILABLE, f"the pool cannot take requests: {first_line(exc)}")
    if isinstance(exc, RequestTimeout):
        return Failure(TIMEOUT, str(exc))
    if isinstance(exc, (ValueError, TypeError)):
        message = str(exc)
        return Failure(INVALID, message, param_of(message, renames))
    if isinstance(exc, MpdpError):       # EngineError (its message names the remote error), WorkerCrashed
        return Failure(ENGINE, first_line(exc))
    return Failure(INTERNAL, f"{type(exc).__name__}: {first_line(exc)}")


def param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The request field a check's message names (the checks start with it: ``"n must be ..."``,
    ``"messages[2] has no 'role'"``, ``"unknown sampling keyword 'tempreature'"``)."""
    from mpdp.config import SAMPLING      # here: errors is imported by everything, config by less

    named = (re.match(r"unknown sampling keyword '(\w+)'", message)
             or re.match(r"the \S+ engine does not support (\w+)", message))
    if named:                             # a field the caller gave, whatever its name
        return (renames or {}).get(named.group(1), named.group(1))
    m = re.match(r"([a-z_]+)(?:\[\d+\])?\b", message)
    if m and (m.group(1) in SAMPLING or m.group(1) in _REQUEST_FIELDS):
        return (renames or {}).get(m.group(1), m.group(1))
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
