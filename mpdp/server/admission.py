"""Room for HTTP requests, on the event loop: at most the pool's ``max_pending`` places taken.

A request takes all its places (one per prompt: one pool request each) at once or waits, in
arrival order, without holding any. Taking them one at a time deadlocked: two 3-prompt requests
under ``max_pending=4`` each held two places and waited for a third that only the other could
give back, until ``queue_timeout``. A request that can never fit is refused at once (400) rather
than held until the timeout while it blocks everyone behind it.

Waiting happens on the event loop, never on threads, bounded by ``queue_timeout`` (then 503), and
a waiting request is never dropped. ``close(error)`` (the end of a drain's grace) fails every
waiter with ``error()`` and refuses later takes.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable

from mpdp.openai_api.response import APIError


class Admission:
    def __init__(self, size: int, timeout: float | None):
        self.size, self.timeout = size, timeout
        self.free = size
        self.waiting = 0                   # places asked for by the requests waiting (a metric)
        self._queue: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._closed: Callable[[], APIError] | None = None

    async def take(self, k: int) -> None:
        """Take ``k`` places, all at once; wait (first come, first served) while they are not free."""
        if self._closed is not None:
            raise self._closed()
        if k > self.size:
            raise APIError(400, f"this request has {k} prompts, more than the server ever runs at once "
                           f"(max_pending={self.size}): send them in requests of at most {self.size}",
                           "invalid_request_error", "prompt")
        if not self._queue and self.free >= k:
            self.free -= k                 # the usual case: room, nobody ahead
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (k, waiter)
        self._queue.append(entry)
        self.waiting += k
        try:
            await asyncio.wait_for(waiter, self.timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give(k)               # granted as the wait ended: hand the places on
            else:
                self._remove(entry)
            if isinstance(exc, asyncio.TimeoutError):
                raise APIError(503, f"the pool stayed full for queue_timeout={self.timeout:g}s",
                               "service_unavailable_error", None, "queue_timeout") from None
            raise
        finally:
            self.waiting -= k

    def give(self, k: int) -> None:
        self.free += k
        self._grant()

    def close(self, error: Callable[[], APIError]) -> None:
        """Fail every waiting request with ``error()``, and every later ``take``."""
        self._closed = error
        while self._queue:
            _, waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    def _remove(self, entry) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            return
        self._grant()                      # a big request that gave up may let smaller ones in

    def _grant(self) -> None:
        queue = self._queue
        while queue and (queue[0][1].done() or queue[0][0] <= self.free):
            k, waiter = queue.popleft()
            if not waiter.done():          # a cancelled waiter is skipped; its owner cleans up
                self.free -= k
                waiter.set_result(None)
