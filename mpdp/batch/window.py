"""The reorder window: requests in flight in input order; the finished prefix goes to the writer.

The job submits up to ``limit`` requests ahead; whenever the oldest ones are done they are
written at once, in input order, as one batch (one flush). A request that finishes out of
order waits in the window until everything before it is done, so memory stays bounded by
``limit`` and the output is in input order, as ``Pool.imap``'s is. Unlike ``imap`` (which hands
a result over only when its window is full or the input is exhausted) nothing finished waits
for later submissions, and the in-flight futures stay reachable, so a stop can cancel them.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from typing import Callable

from mpdp.batch.formats import Item
from mpdp.batch.output import DurableWriter, Row

# render(item, result or exception) -> (output line, completion tokens, worker or None if it failed)
Render = Callable[[Item, object], Row]


class OrderedWindow:
    def __init__(self, limit: int, render: Render, writer: DurableWriter):
        self.limit, self.render, self.writer = limit, render, writer
        self._q: deque[tuple[Item, Future]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    @property
    def full(self) -> bool:
        return len(self._q) >= self.limit

    def push(self, item: Item, future: Future) -> None:
        self._q.append((item, future))

    def drain(self) -> int:
        """Write every finished request at the head of the window; returns how many.

        ``render`` may raise (a pool-level failure that must stop the job instead of being
        written as the request's result): what was rendered before it is written first.
        """
        rows = []
        try:
            while self._q and self._q[0][1].done():
                item, future = self._q[0]
                rows.append(self.render(item, _outcome(future)))
                self._q.popleft()
        finally:
            self.writer.write(rows)
        return len(rows)

    def wait_head(self, timeout: float) -> None:
        """Block until the oldest request is done or ``timeout`` seconds pass."""
        if self._q:
            wait([self._q[0][1]], timeout=timeout, return_when=FIRST_COMPLETED)

    def cancel_all(self) -> tuple[int, int]:
        """Cancel (and so abort in the engines) every request not written yet. Returns (requests
        aborted, requests that had finished but wait behind an unfinished one: dropped with it)."""
        pending, self._q = self._q, deque()
        aborted = sum(1 for _, future in pending if future.cancel())
        return aborted, len(pending) - aborted


def _outcome(future: Future):
    if future.cancelled():
        return CancelledError("the request was cancelled")
    exc = future.exception()
    return exc if exc is not None else future.result()
