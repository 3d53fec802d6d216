"""Admission: the pool's state, request ids and the ``max_pending`` bound, under one lock.

Caller threads ask ``admit(n)`` for ids (waiting, never dropping, while the pool is full);
the dispatcher reports ``resolved(n)`` once per round and changes the state. Nothing else
is shared between callers and the dispatcher except its command queue.
"""

from __future__ import annotations

import enum
import threading

from mpdp import errors


class PoolState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"     # close(wait=True): no new requests, pending ones finish
    CLOSED = "closed"
    BROKEN = "broken"


_OPEN = (PoolState.STARTING, PoolState.RUNNING)


class Admission:
    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.state = PoolState.STARTING
        self.submitted = 0            # requests admitted
        self.completed = 0            # requests resolved (by the dispatcher)
        self._last_id = 0
        self._waiters = 0
        self._cond = threading.Condition()

    @property
    def pending(self) -> int:
        return self.submitted - self.completed

    def has_room(self, n: int) -> bool:
        return self.submitted - self.completed + n <= self.max_pending

    def admit(self, n: int) -> int:
        """Reserve ``n`` ids (the first is returned), waiting while the pool is full.
        Raises PoolClosed once the pool no longer takes requests."""
        with self._cond:
            if self.state in _OPEN and self.submitted - self.completed + n > self.max_pending:
                self._waiters += 1
                try:
                    while self.state in _OPEN and self.submitted - self.completed + n > self.max_pending:
                        self._cond.wait(0.5)
                finally:
                    self._waiters -= 1
            if self.state not in _OPEN:
                raise errors.PoolClosed(f"the pool is {self.state.value}; no new requests")
            first = self._last_id + 1
            self._last_id += n
            self.submitted += n
            return first

    def resolved(self, n: int) -> None:
        """From the dispatcher: ``n`` more requests left the pending table."""
        if not n:
            return
        self.completed += n              # only the dispatcher writes it; readers tolerate a stale value
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def set_state(self, state: PoolState) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    def begin_close(self, wait: bool) -> bool:
        """Stop taking requests now (so submit raises at once). False if already closed."""
        with self._cond:
            if self.state in (PoolState.CLOSED, PoolState.BROKEN):
                return False
            self.state = PoolState.DRAINING if wait else PoolState.CLOSED
            self._cond.notify_all()
            return True
