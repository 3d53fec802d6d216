"""Pure scheduling: waiting requests in, micro-batches per worker out. No sockets, no threads, no clocks.

Each worker advertises a credit (how many requests its engine wants to hold). The scheduler
never shards statically: a request is bound to a worker only when that worker has a free
slot, so a fast worker takes more and stragglers do not pile up behind a slow one (late
binding). Among workers with free slots, the routing policy picks one; the default picks
the one with the fewest outstanding estimated tokens.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol


@dataclass(slots=True)
class Ticket:
    """A request as the scheduler sees it: an id, an estimated cost in tokens, an optional prefix key."""

    id: int
    cost: int = 1
    prefix: int | None = None


@dataclass(slots=True)
class WorkerLoad:
    index: int
    capacity: int
    in_flight: dict[int, Ticket] = field(default_factory=dict)
    outstanding: int = 0          # sum of the in-flight tickets' cost

    @property
    def free(self) -> int:
        return self.capacity - len(self.in_flight)


class RoutingPolicy(Protocol):
    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad: ...


class LeastLoaded:
    """The worker with the fewest outstanding tokens (then the fewest requests)."""

    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad:
        return min(candidates, key=_load_key)


def _load_key(w: WorkerLoad) -> tuple[int, int]:
    return (w.outstanding, len(w.in_flight))


class PrefixAffinity(LeastLoaded):
    """Send a request to the worker that last served its prompt prefix (its KV cache holds it),
    unless that worker is more than ``slack`` tokens busier than the least-loaded one."""

    def __init__(self, slack: int = 4096, remember: int = 65536):
        self.slack = slack
        self.remember = remember
        self._last: OrderedDict[int, int] = OrderedDict()   # prefix -> worker index, LRU

    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad:
        best = min(candidates, key=_load_key)
        if ticket.prefix is None:
            return best
        owner = self._last.get(ticket.prefix)
        chosen = best
        if owner is not None and owner != best.index:
            for w in candidates:
                if w.index == owner and w.outstanding <= best.outstanding + self.slack:
                    chosen = w
                    break
        self._last[ticket.prefix] = chosen.index
        self._last.move_to_end(ticket.prefix)
        if len(self._last) > self.remember:
            self._last.popitem(last=False)
        return chosen


POLICIES = {"least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity}


class Scheduler:
    def __init__(self, policy: RoutingPolicy | None = None, max_batch: int = 512):
        self.policy = policy or LeastLoaded()
        self.max_batch = max_batch
        self.waiting: deque[Ticket] = deque()
        self.workers: dict[int, WorkerLoad] = {}
        self._dropped: set[int] = set()   # ids cancelled while waiting (removed lazily)

    # -- workers -------------------------------------------------------------------------------
    def add_worker(self, index: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"worker {index} advertised capacity {capacity}; it must be >= 1")
        self.workers[index] = WorkerLoad(index, capacity)

    def remove_worker(self, index: int) -> list[Ticket]:
        """Forget a worker; return exactly the tickets it held (the caller requeues or fails them)."""
        load = self.workers.pop(index, None)
        return list(load.in_flight.values()) if load else []

    # -- requests ------------------------------------------------------------------------------
    def enqueue(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)

    def enqueue_front(self, tickets: Iterable[Ticket]) -> None:
        """Put requests back at the head of the queue (they were in flight on a worker that died)."""
        self.waiting.extendleft(reversed(list(tickets)))

    def assign(self, index: int, ticket: Ticket) -> None:
        """Bind one request to this worker, bypassing the queue and the policy (the dispatcher's
        crash suspects, which it retries one per worker)."""
        load = self.workers[index]
        load.in_flight[ticket.id] = ticket
        load.outstanding += ticket.cost

    def drop(self, request_id: int) -> int | None:
        """Forget a request wherever it is. Returns the worker index holding it, or None if it was waiting."""
        for load in self.workers.values():
            ticket = load.in_flight.pop(request_id, None)
            if ticket is not None:
                load.outstanding -= ticket.cost
                return load.index
        self._dropped.add(request_id)
        return None

    def finished(self, index: int, request_id: int) -> bool:
        """A worker returned a request. False if the scheduler did not think it held it (ignore it)."""
        load = self.workers.get(index)
        ticket = load.in_flight.pop(request_id, None) if load else None
        if ticket is None:
            return False
        load.outstanding -= ticket.cost
        return True

    def where(self, request_id: int) -> int | None:
        for load in self.workers.values():
            if request_id in load.in_flight:
                return load.index
        return None

    # -- the policy ----------------------------------------------------------------------------
    def schedule(self) -> dict[int, list[Ticket]]:
        """Bind waiting requests to workers with free credit; one micro-batch per worker."""
        batches: dict[int, list[Ticket]] = {}
        open_workers = [w for w in self.workers.values() if w.free > 0]
        waiting, dropped = self.waiting, self._dropped
        while waiting and open_workers:
            ticket = waiting.popleft()
            if dropped and ticket.id in dropped:
                dropped.discard(ticket.id)
                continue
            w = self.policy.choose(ticket, open_workers) if len(open_workers) > 1 else open_workers[0]
            w.in_flight[ticket.id] = ticket
            w.outstanding += ticket.cost
            batch = batches.setdefault(w.index, [])
            batch.append(ticket)
            if w.free <= 0 or len(batch) >= self.max_batch:
                open_workers.remove(w)
        if not waiting:
            dropped.clear()
        return batches

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - len(self._dropped)
