"""The pool's futures: ``concurrent.futures.Future`` whose cancel aborts the request in its
engine, and whose done-callbacks never run on the dispatcher thread.

A done-callback is user code: it may block, call ``pool.submit`` while the pool is full, or
call ``pool.generate`` and wait for results only the dispatcher can deliver. Run on the
dispatcher thread (where ``set_result`` is called) any of these stalled or deadlocked the
whole pool and made healthy workers look silent. So callbacks go to a small thread pool of
their own; a blocked callback holds one of its threads and nothing else. Futures without
callbacks, the common case, cost nothing extra.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

CALLBACK_THREADS = 32

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _callbacks() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="mpdp-callback")
    return _executor


class PoolFuture(Future):
    """The pool never marks its futures RUNNING, so cancel() succeeds until the result is set."""

    def __init__(self, request_id: int, on_cancel):
        super().__init__()
        self.request_id = request_id
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        if super().cancel():
            self._on_cancel(self.request_id)
            return True
        return False

    def _invoke_callbacks(self):
        if self._done_callbacks:
            try:
                _callbacks().submit(super()._invoke_callbacks)
            except RuntimeError:     # the interpreter is shutting down: its executors take no work
                super()._invoke_callbacks()   # (which logs, never raises, a callback's error)

    # Called by the dispatcher only; a future cancelled meanwhile keeps its cancellation.
    def resolve(self, value) -> None:
        try:
            self.set_result(value)
        except InvalidStateError:
            pass

    def fail(self, exc: BaseException) -> None:
        try:
            self.set_exception(exc)
        except InvalidStateError:
            pass


def failed_future(exc: BaseException) -> Future:
    """A future that already holds ``exc`` (a bad item in its place among good ones)."""
    f = Future()
    f.set_exception(exc)
    return f
