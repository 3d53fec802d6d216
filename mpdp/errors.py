"""The errors a caller of mpdp can see. Each keeps its cause (remote traceback, exit code, signal)."""

from __future__ import annotations

import signal as _signal


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


class RequestTimeout(MpdpError, TimeoutError):
    """The request's own ``timeout`` passed; it was aborted inside the engine."""


class EngineError(MpdpError, RuntimeError):
    """The engine failed this request (the remote traceback is in the message)."""


class ContextWindowExceededError(MpdpError, ValueError):
    """The prompt (plus max_tokens, where the engine checks it) does not fit the model's context."""


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
