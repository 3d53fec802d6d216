"""Prefixes sent to a worker whose storing its engine has not confirmed yet: the event index's
speculative layer.

The event index (``kv_index.py``) knows a block only once the engine has stored it and its event
has come back: when the request that carries it is scheduled, which under load is seconds after it
was sent (it waits in the engine's queue behind the requests already there, and a long context
fills a step on its own). Routed by the confirmed blocks alone, every request that follows a new
prefix within that time sees it cached nowhere and goes to the least-loaded worker, so the pool's
engines each prefill and cache the same prefixes (measured on one H100 with an 8B-shaped model:
the exact index routed document QA at half the mirror's rate, 0.67 of the prompt cached against
0.87). The mirror never had that gap: it records a prompt the moment it is sent.

So a request routed to worker w makes its blocks **pending on w** until it is over: while it is in
flight its blocks are either queued for computing on w (a follower sent there finds them: the
engine schedules in order, and caches a block as soon as it is allocated) or held by it (a running
request pins its blocks). When it finishes, the engine's events have stored its blocks (they are
published when the request is scheduled, before it can finish), or are on their way: the claim
stays until the index has applied one more batch of that worker, then goes. From there on the
event index alone says what is cached, evictions included. Routing takes, per worker, the longer of
its confirmed and its pending match: both are chains from the prompt's first block (a claim is a
whole prefix, the index drops a block whose parent it does not know), so the longer one is the
match of their union.

Claims are kept at every ``stride``-th block key of the engine's block chain. The default, every
block, makes the predicted reuse exact (the policy's "within one block" figure); a stride of 4
routed the same in ``bench/prefix_sim.py`` for about 60% of the dispatcher work (2,244-token
prompts: 36 against 57 µs a request, 22 without the pending layer) but knows a pending prefix only
to within 4 blocks. Memory: the claims of the requests in flight (bounded by the workers' credit)
plus, per worker, at most ``max_draining`` finished ones waiting for a batch.

Pure code, on the dispatcher thread; ``batches`` figures are the index's count of applied batches
per worker (``KVIndex.batches``), read without locks.
"""

from __future__ import annotations

from collections import deque

from mpdp.routing.kv_index import drop_holder, longest_matches, uncount


class PendingBlocks:
    """Per-worker claims on block keys, counted (several requests may claim one prefix)."""

    def __init__(self, stride: int = 1, max_draining: int = 1024):
        if stride < 1 or max_draining < 0:
            raise ValueError("stride must be >= 1 and max_draining >= 0")
        self.stride = stride
        self.max_draining = max_draining
        self.holders: dict[int, int] = {}                     # block key -> bitmask of claiming workers
        self._counts: dict[int, dict[int, int]] = {}          # worker -> {block key: claims}
        self._generation: dict[int, int] = {}                 # worker -> incarnation (claims die with it)
        self._draining: dict[int, deque] = {}                 # worker -> (marks, batches at finish), oldest first

    def marks(self, keys: tuple[int, ...]) -> tuple[int, ...]:
        """The keys a claim is kept at: every ``stride``-th block of the chain."""
        s = self.stride
        return keys[s - 1::s] if s > 1 else keys

    # -- workers -----------------------------------------------------------------------------------
    def add_worker(self, index: int) -> None:
        """A fresh engine: no claims (a request sent to its previous incarnation is gone with it)."""
        self.remove_worker(index)
        self._generation[index] = self._generation.get(index, 0) + 1
        self._counts[index] = {}
        self._draining[index] = deque()

    def has_worker(self, index: int) -> bool:
        return index in self._counts

    def remove_worker(self, index: int) -> None:
        counts = self._counts.pop(index, None)
        self._draining.pop(index, None)
        if not counts:
            return
        holders, keep = self.holders, ~(1 << index)
        for k in counts:
            drop_holder(holders, k, keep)

    # -- requests ----------------------------------------------------------------------------------
    def claim(self, index: int, marks: tuple[int, ...]) -> tuple[int, int] | None:
        """Claim ``marks`` on worker ``index``; the claim to give back to ``finish`` (None: no such worker)."""
        counts = self._counts.get(index)
        if counts is None or not marks:
            return None
        holders, bit = self.holders, 1 << index
        for k in marks:
            n = counts.get(k)
            if n is None:
                counts[k] = 1
                holders[k] = holders.get(k, 0) | bit
            else:
                counts[k] = n + 1
        return (index, self._generation[index])

    def finish(self, claim: tuple[int, int], marks: tuple[int, ...], batches: int) -> None:
        """The request is over: its claim waits for the worker's next event batch (``drain``)."""
        index, generation = claim
        if self._generation.get(index) != generation or index not in self._counts:
            return                                            # the worker restarted or left: nothing to give back
        q = self._draining[index]
        q.append((marks, batches))
        if len(q) > self.max_draining:
            self._release(index, q.popleft()[0])

    def drain(self, index: int, batches: int) -> None:
        """Give back the finished claims on ``index`` that a batch has followed since (``batches``
        is the worker's count of applied batches now)."""
        q = self._draining.get(index)
        while q and q[0][1] != batches:
            self._release(index, q.popleft()[0])

    def release(self, claim: tuple[int, int], marks: tuple[int, ...]) -> None:
        """Give a claim back at once (a request re-routed elsewhere)."""
        index, generation = claim
        if self._generation.get(index) == generation:
            self._release(index, marks)

    def _release(self, index: int, marks: tuple[int, ...]) -> None:
        counts = self._counts.get(index)
        if counts is None:
            return
        holders, keep = self.holders, ~(1 << index)
        for k in marks:
            if uncount(counts, k):
                drop_holder(holders, k, keep)

    # -- matching ----------------------------------------------------------------------------------
    def match(self, marks: tuple[int, ...], candidates) -> dict[int, int]:
        """Blocks of a prompt pending on each candidate, from its start (a multiple of ``stride``)."""
        depth = longest_matches(self.holders, marks, candidates)
        s = self.stride
        if s > 1:
            for i in depth:
                depth[i] *= s
        return depth

    # -- reports -----------------------------------------------------------------------------------
    def keys(self, index: int) -> int:
        counts = self._counts.get(index)
        return len(counts) if counts else 0

    def draining(self, index: int) -> int:
        q = self._draining.get(index)
        return len(q) if q else 0
