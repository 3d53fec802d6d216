"""Pure scheduling: waiting requests in, micro-batches per worker out. No sockets, no threads, no clocks.

Each worker advertises a credit (how many requests its engine wants to hold). The scheduler
never shards statically: a request is bound to a worker only when that worker has a free
slot, so a fast worker takes more and stragglers do not pile up behind a slow one (late
binding). Among workers with free slots the routing policy picks one (``policies.py``).

Crashes are decided here too, so that they can be tested without processes. Most crashes are
not caused by a request (out of memory, a GPU error, a node going away), so:

- a request on its first crash goes back to the head of the queue and runs again in
  parallel with everything else, at full credit;
- a request that was on two or more workers that died is a *suspect*. The suspects of one
  death form a group; a group runs on a worker holding no other group (next to ordinary
  work), and when that worker dies too the group is split in two halves that run on
  different workers. A poison request is thus cornered in about log2(n) crashes while its
  innocent neighbours finish;
- a suspect that crashes a worker while it is alone in its group has been isolated: once it
  has crashed ``max_crashes`` workers it fails (``worker_died`` returns it as failed).
  ``max_crashes=1`` means no retry at all: everything on a dead worker fails with it.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable

from mpdp.routing.policies import LeastLoaded, RoutingPolicy
from mpdp.routing.tickets import Ticket, WorkerLoad

# However unlucky, a request is given up after this many crashes beyond max_crashes.
CRASH_HARD_LIMIT = 24


def _hook(policy: RoutingPolicy, name: str):
    """The policy's bound method ``name``, or None where it is the base class's no-op."""
    hook = getattr(policy, name)
    return None if getattr(hook, "__func__", None) is getattr(RoutingPolicy, name) else hook


class Scheduler:
    def __init__(self, policy: RoutingPolicy | None = None, max_batch: int = 512, max_crashes: int = 2,
                 max_batch_bytes: int | None = None):
        self.policy = policy or LeastLoaded()
        self.max_batch = max_batch
        self.max_crashes = max_crashes
        self.waiting: deque[Ticket] = deque()
        self.groups: deque[list[Ticket]] = deque()     # suspect groups waiting for a worker
        self.workers: dict[int, WorkerLoad] = {}
        self._dropped: set[int] = set()   # ids cancelled while waiting (removed lazily)
        self._group_ids = itertools.count(1)

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: RoutingPolicy) -> None:
        # The per-request hooks a policy leaves as the base class's no-ops are not called: two
        # calls a request that least_loaded and cache_aware's misses would spend on nothing.
        self._policy = policy
        self._assigned = _hook(policy, "assigned")
        self._finished = _hook(policy, "finished")

    # -- workers -------------------------------------------------------------------------------
    def add_worker(self, index: int, capacity: int, info: dict | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"worker {index} advertised capacity {capacity}; it must be >= 1")
        self.workers[index] = WorkerLoad(index, capacity)
        self.policy.worker_added(index, info or {})

    def set_capacity(self, index: int, capacity: int) -> None:
        """A worker's credit moved (its batch limit): below what it holds, it takes nothing new."""
        load = self.workers.get(index)
        if load is not None:
            load.capacity = max(1, capacity)

    def remove_worker(self, index: int) -> list[Ticket]:
        """Forget a worker; return exactly the tickets it held (without crash accounting)."""
        load = self.workers.pop(index, None)
        self.policy.worker_removed(index)
        return list(load.in_flight.values()) if load else []

    def worker_died(self, index: int) -> tuple[list[Ticket], list[Ticket]]:
        """A worker died: requeue or regroup what it held. Returns (retried, failed) tickets."""
        held = self.remove_worker(index)
        for t in held:
            t.crashes += 1
        if self.max_crashes <= 1:
            return [], held
        retry, failed, group, repeat = [], [], [], []
        for t in held:
            if t.group is not None:
                group.append(t)
            elif t.crashes == 1:
                retry.append(t)
            else:
                repeat.append(t)          # crashed before, then again next to other work
        if len(group) == 1:               # isolated: this one crashed a worker on its own
            t = group[0]
            if t.crashes >= self.max_crashes:
                failed.append(t)
            else:
                self._add_group([t])
        elif group:
            half = (len(group) + 1) // 2
            self._add_group(group[:half])
            self._add_group(group[half:])
        if repeat:
            self._add_group(repeat)
        for t in list(itertools.chain.from_iterable(self.groups)):
            if t.crashes >= self.max_crashes + CRASH_HARD_LIMIT and t not in failed:
                failed.append(t)
        if failed:
            gone = {t.id for t in failed}
            self.groups = deque(g2 for g in self.groups if (g2 := [t for t in g if t.id not in gone]))
        self.enqueue_front(retry)
        return retry, failed

    def _add_group(self, tickets: list[Ticket]) -> None:
        gid = next(self._group_ids)
        for t in tickets:
            t.group = gid
        self.groups.append(tickets)

    # -- requests ------------------------------------------------------------------------------
    def enqueue(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)

    def enqueue_front(self, tickets: Iterable[Ticket]) -> None:
        """Put requests back at the head of the queue."""
        self.waiting.extendleft(reversed(list(tickets)))

    def drop(self, request_id: int) -> int | None:
        """Forget a request wherever it is. Returns the worker index holding it, or None."""
        for load in self.workers.values():
            ticket = load.in_flight.get(request_id)
            if ticket is not None:
                self._release(load, ticket)
                return load.index
        for group in self.groups:
            for t in group:
                if t.id == request_id:
                    group.remove(t)
                    return None
        self._dropped.add(request_id)
        return None

    def finished(self, index: int, request_id: int) -> Ticket | None:
        """A worker returned a request. None if the scheduler did not think it held it (ignore it)."""
        load = self.workers.get(index)
        ticket = load.in_flight.get(request_id) if load else None
        if ticket is None:
            return None
        self._release(load, ticket)
        return ticket

    def _release(self, load: WorkerLoad, ticket: Ticket) -> None:
        del load.in_flight[ticket.id]
        load.outstanding -= ticket.cost
        if ticket.group is not None and ticket.group == load.suspects:
            if not any(t.group == ticket.group for t in load.in_flight.values()):
                load.suspects = None      # the group is done here: the worker may take another
        if self._finished is not None:
            self._finished(ticket, load.index)

    def where(self, request_id: int) -> int | None:
        for load in self.workers.values():
            if request_id in load.in_flight:
                return load.index
        return None

    # -- the policy ----------------------------------------------------------------------------
    def schedule(self) -> dict[int, list[Ticket]]:
        """Bind suspect groups, then waiting requests, to workers with free credit; one micro-batch per worker."""
        batches: dict[int, list[Ticket]] = {}
        if self.groups:
            self._place_groups(batches)
        if not self.waiting:
            return batches
        open_workers = [w for w in self.workers.values()
                        if w.free > 0 and len(batches.get(w.index, ())) < self.max_batch]
        waiting, dropped, policy = self.waiting, self._dropped, self.policy
        while waiting and open_workers:
            ticket = waiting.popleft()
            if dropped and ticket.id in dropped:
                dropped.discard(ticket.id)
                continue
            w = policy.choose(ticket, open_workers) if len(open_workers) > 1 else open_workers[0]
            self._bind(w, ticket)
            batch = batches.setdefault(w.index, [])
            batch.append(ticket)
            if w.free <= 0 or len(batch) >= self.max_batch:
                open_workers.remove(w)
        if not waiting:
            dropped.clear()
        return batches

    def _place_groups(self, batches: dict[int, list[Ticket]]) -> None:
        """Each worker holding no suspect group takes one (the emptiest first), as far as its credit goes."""
        free = sorted((w for w in self.workers.values() if w.suspects is None and w.free > 0),
                      key=lambda w: -w.free)
        for w in free:
            if not self.groups:
                return
            group = self.groups.popleft()
            if not group:
                continue
            if len(group) > w.free:           # the rest waits as a group of its own
                self.groups.appendleft(group[w.free:])
                group = group[:w.free]
            w.suspects = group[0].group
            for t in group:
                self._bind(w, t)
            batches.setdefault(w.index, []).extend(group)

    def _bind(self, w: WorkerLoad, ticket: Ticket) -> None:
        w.in_flight[ticket.id] = ticket
        w.outstanding += ticket.cost
        if self._assigned is not None:
            self._assigned(ticket, w.index)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self.waiting) - len(self._dropped)) + sum(map(len, self.groups))
