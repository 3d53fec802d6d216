"""Routing policies: which of the workers with free credit takes a request.

A policy is told everything that changes what a worker holds, so that it can mirror it (a
cache-aware policy mirrors each worker's prefix cache this way):

    route_key(request)        in the caller's thread, at submit: what the policy wants to remember
                              about a request (a prefix hash, block hashes); kept on the ticket
    choose(ticket, workers)   in the scheduler: one of the workers that have free credit
    assigned(ticket, index)   the ticket was bound to that worker (by choose or by a retry lane)
    finished(ticket, index)   the worker returned it (or it was aborted there)
    worker_added(index, info) a worker became READY; ``info`` is its READY record
    worker_removed(index)     a worker died or stopped: whatever it cached is gone
    reported(ticket, index, prompt_tokens, cached_tokens)
                              the engine said how many prompt tokens it found cached (vLLM only)

Policies are pure code (no clocks, no I/O) and run on the dispatcher thread, except
``route_key``, which must therefore not touch the policy's state.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mpdp.routing.tickets import Ticket, WorkerLoad


class RoutingPolicy:
    """The base policy: least loaded, no memory. Subclasses override what they need."""

    def route_key(self, request) -> Any:
        return None

    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad:
        return min(candidates, key=load_key)

    def assigned(self, ticket: Ticket, index: int) -> None:
        pass

    def finished(self, ticket: Ticket, index: int) -> None:
        pass

    def worker_added(self, index: int, info: dict) -> None:
        pass

    def worker_removed(self, index: int) -> None:
        pass

    def reported(self, ticket: Ticket, index: int, prompt_tokens: int, cached_tokens: int) -> None:
        pass


def load_key(w: WorkerLoad) -> tuple[int, int]:
    return (w.outstanding, len(w.in_flight))


class LeastLoaded(RoutingPolicy):
    """The worker with the fewest outstanding tokens (then the fewest requests)."""


class PrefixAffinity(RoutingPolicy):
    """Send a request to the worker that last served its prompt's first ``chars`` characters,
    unless that worker is more than ``slack`` tokens busier than the least-loaded one."""

    def __init__(self, slack: int = 4096, remember: int = 65536, chars: int = 256):
        self.slack = slack
        self.remember = remember
        self.chars = chars
        self._last: OrderedDict[int, int] = OrderedDict()   # prefix -> worker index, LRU

    def route_key(self, request) -> int:
        if request.prompt is not None:
            return hash(request.prompt[:self.chars])
        if request.messages is not None:
            return hash(request.messages[0]["content"][:self.chars])
        return hash(tuple(request.prompt_token_ids[:self.chars // 4]))

    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad:
        best = min(candidates, key=load_key)
        owner = self._last.get(ticket.route) if ticket.route is not None else None
        if owner is not None and owner != best.index:
            for w in candidates:
                if w.index == owner and w.outstanding <= best.outstanding + self.slack:
                    return w
        return best

    def assigned(self, ticket: Ticket, index: int) -> None:
        if ticket.route is None:
            return
        self._last[ticket.route] = index
        self._last.move_to_end(ticket.route)
        if len(self._last) > self.remember:
            self._last.popitem(last=False)

    def worker_removed(self, index: int) -> None:
        # Its cache died with it: remembering it would send prefixes to a cold restart.
        for key in [k for k, w in self._last.items() if w == index]:
            del self._last[key]
