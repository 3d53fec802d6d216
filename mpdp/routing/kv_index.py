"""The exact prefix-cache index: the KV blocks each engine holds, kept from the engine's own events.

vLLM publishes what its prefix cache does (``kv_events_config``): ``BlockStored`` names the
blocks it cached, each by the engine's hash, with the hash of the block before the first one
(``parent_block_hash``) and their token ids; ``BlockRemoved`` names the hashes it evicted;
``AllBlocksCleared`` empties it. Batches of events carry a sequence number per publisher.

**Keys.** mpdp does not reproduce the engine's hash (it is seeded per engine, and sha256 or a
builtin hash depending on options). It names a block by its own chained key,
``hash((parent key, block token ids))``, from the tokens the event carries, and keeps per worker
the map engine hash -> key to follow a later event's ``parent_block_hash`` and removals. A
caller computes the same keys from a prompt's token ids (``block_keys``, in its own thread), so a
request matches a worker in the engine's block units. Python's hash of a tuple of ints is the same
in every thread of a process, which is all that is needed: both sides run in the pool's process.

**Never stale.** The index may hold less than the engine (a block stored before the index
started listening, an event after a lost parent), never more:

- a ``BlockStored`` whose parent the index does not know is dropped (its keys cannot be chained);
  the engine holds it, the index under-counts, which costs a prefill, never a wrong claim;
- the engine can hold two copies of one block (two requests filled it at once) and evicts them
  one at a time: each engine hash is counted, and its key leaves only with its last copy;
- a sequence gap is reported to the caller (``apply`` returns ``GAP`` and applies nothing): the
  listener replays the missed batches from the engine's replay socket, or clears the worker and
  goes on from the next batch (``restart``);
- a worker whose index could be stale is not ``live``: the policy uses its mirror for it;
- a worker holding more blocks than its engine can (``limit``) has missed removals: it is cleared.

**Threads.** One listener thread writes everything here except two maps the dispatcher thread
writes: ``wanted`` (which engine, by its topic, each worker index should follow; set at READY,
removed at death) and ``expected`` (per worker, requests that stored blocks while no batch of
that worker came in since they were sent; the listener declares a worker's events stopped when
these grow and no batch follows). The
dispatcher reads ``holders`` and ``live`` without locks: single dict operations are atomic
under the GIL, and a read that races an update sees the state just before or just after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The seed of every key chain (any fixed int: keys are compared only within one process).
ROOT = 0x6D706470_6B76

# Normalised events (the listener turns vLLM's structs into these tuples).
STORED, REMOVED, CLEARED = 0, 1, 2
# What apply() did with a batch.
APPLIED, DUPLICATE, GAP, UNKNOWN = "applied", "duplicate", "gap", "unknown"


def block_keys(ids, block_size: int, limit: int | None = None) -> tuple[int, ...]:
    """The chained keys of the whole ``block_size`` blocks of ``ids`` (at most ``limit`` blocks)."""
    n = len(ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out, h = [], ROOT
    for start in range(0, n * block_size, block_size):
        h = hash((h, tuple(ids[start:start + block_size])))
        out.append(h)
    return tuple(out)


def cacheable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Blocks of a prompt the engine can take from its cache: whole ones, and never the prompt's
    last token (vLLM recomputes it to sample from it, so a fully cached prompt reuses one block less
    when its length is a multiple of the block size)."""
    return max(0, num_prompt_tokens - 1) // block_size


def uncount(counts: dict, key) -> bool:
    """One copy (or claim) of ``key`` fewer; True when that was the last (``key`` is gone from
    ``counts``), False when others are left or it was not counted."""
    n = counts.get(key)
    if n is None:
        return False
    if n > 1:
        counts[key] = n - 1
        return False
    del counts[key]
    return True


def drop_holder(holders: dict[int, int], key: int, keep: int) -> None:
    """Take a worker's bit out of ``key``'s holders (``keep``: every bit but that one); the entry
    goes with its last holder."""
    rest = holders.get(key, 0) & keep
    if rest:
        holders[key] = rest
    else:
        holders.pop(key, None)


def longest_matches(holders: dict[int, int], blocks, candidates) -> dict[int, int]:
    """Blocks of the chain ``blocks`` each candidate (by index) holds from the start, in one walk:
    ``holders`` maps a block to the bitmask of the workers holding it; the walk stops where the last
    candidate drops out (a miss costs one lookup, a match of k blocks k + 1)."""
    depth = dict.fromkeys(candidates, 0)
    alive = 0
    for i in candidates:
        alive |= 1 << i
    for pos, h in enumerate(blocks):
        held = holders.get(h, 0) & alive
        if held != alive:
            dropped, alive = alive & ~held, held
            while dropped:                     # the workers whose match ends at this block
                low = dropped & -dropped
                depth[low.bit_length() - 1] = pos
                dropped ^= low
            if not alive:
                return depth
    while alive:                               # the whole chain is held
        low = alive & -alive
        depth[low.bit_length() - 1] = len(blocks)
        alive ^= low
    return depth


@dataclass(slots=True, frozen=True)
class Feed:
    """One engine's event stream, as its worker announced it in READY."""

    topic: str
    endpoint: str
    replay_endpoint: str | None
    block_size: int
    limit: int                      # the most blocks its cache can hold (a sanity bound)


def feed_from_ready(info: dict) -> Feed | None:
    """The event stream a worker announced in READY (``extra.kv_events``), or None."""
    extra = info.get("extra") if isinstance(info, dict) else None
    spec = extra.get("kv_events") if isinstance(extra, dict) else None
    if not isinstance(spec, dict):
        return None
    topic, endpoint, size = spec.get("topic"), spec.get("endpoint"), spec.get("block_size")
    if not (isinstance(topic, str) and isinstance(endpoint, str) and isinstance(size, int) and size > 0):
        return None
    replay = spec.get("replay_endpoint")
    tokens = info.get("kv_cache_tokens")
    # The engine holds at most its cache's blocks; twice that and some slack before the index
    # decides it missed removals (duplicates of one block count once).
    limit = 2 * (tokens // size) + 1024 if isinstance(tokens, int) and tokens > 0 else 1 << 22
    return Feed(topic, endpoint, replay if isinstance(replay, str) else None, size, limit)


@dataclass(slots=True)
class _Worker:
    feed: Feed
    next_seq: int = 0
    keys: dict = field(default_factory=dict)     # engine hash -> our key
    copies: dict = field(default_factory=dict)   # engine hash -> copies the engine holds
    # what happened, for stats() and tests
    batches: int = 0
    events: int = 0
    orphans: int = 0        # stored blocks dropped: their parent was unknown
    resyncs: int = 0        # gaps recovered from the replay socket
    restarts: int = 0       # gaps that cleared the worker instead
    overflows: int = 0      # times it held more than its limit and was cleared


class KVIndex:
    """Per-worker exact block sets, fed by ``apply``; matched with ``match`` (module doc)."""

    def __init__(self):
        self.holders: dict[int, int] = {}      # our key -> bitmask of the workers holding it
        self.live: dict[int, str] = {}         # worker -> topic whose index is complete and current
        self.wanted: dict[int, Feed] = {}      # written by the dispatcher thread only
        self.expected: dict[int, tuple[int, int]] = {}   # dispatcher thread only: (count, batches seen)
        self._workers: dict[int, _Worker] = {}

    # -- the dispatcher thread ---------------------------------------------------------------------
    def want(self, index: int, feed: Feed | None) -> None:
        """Follow ``feed`` for worker ``index`` (None: follow nothing). The listener acts on it."""
        if feed is None:
            self.wanted.pop(index, None)
        else:
            self.wanted[index] = feed

    def expect(self, index: int, seen: int | None = None) -> None:
        """A request finished on ``index`` that stored new blocks, and no batch of that worker was
        applied since it was sent (``seen``: ``batches(index)`` then; None: now): its batch must be
        on its way. The listener gives it ``stale_s`` to come."""
        count = self.expected.get(index, (0, 0))[0] + 1
        self.expected[index] = (count, self.batches(index) if seen is None else seen)

    def batches(self, index: int) -> int:
        """Batches applied for the worker's current engine (0 before the listener follows it)."""
        w = self._workers.get(index)
        return w.batches if w is not None else 0

    def usable(self, index: int, block_size: int | None = None) -> bool:
        """The worker's index is complete and current for the engine it runs now (and keyed in
        ``block_size`` blocks, when given)."""
        feed = self.wanted.get(index)
        return (feed is not None and self.live.get(index) == feed.topic
                and (block_size is None or feed.block_size == block_size))

    def match(self, keys, candidates) -> dict[int, int]:
        return longest_matches(self.holders, keys, candidates)

    # -- the listener thread -----------------------------------------------------------------------
    def start(self, index: int, feed: Feed) -> None:
        """Begin following a fresh engine: nothing cached, the first batch is sequence 0."""
        self.stop(index)
        self._workers[index] = _Worker(feed)
        self.live[index] = feed.topic          # an engine that has just started holds nothing

    def stop(self, index: int) -> None:
        """Forget the worker (dead, or no longer followed)."""
        self.live.pop(index, None)
        w = self._workers.pop(index, None)
        if w is not None:
            self._drop_all(index, w)

    def feed_of(self, index: int) -> Feed | None:
        w = self._workers.get(index)
        return w.feed if w is not None else None

    def next_seq(self, index: int) -> int | None:
        w = self._workers.get(index)
        return w.next_seq if w is not None else None

    def apply(self, index: int, seq: int, events) -> str:
        """Apply one batch if it is the next in sequence (APPLIED); DUPLICATE if already seen; GAP
        (nothing applied) if batches are missing: resync with ``apply`` of the missed ones, or
        ``restart``."""
        w = self._workers.get(index)
        if w is None:
            return UNKNOWN
        if seq < w.next_seq:
            return DUPLICATE
        if seq > w.next_seq:
            return GAP
        w.next_seq = seq + 1
        w.batches += 1
        bit = 1 << index
        for event in events:
            w.events += 1
            kind = event[0]
            if kind == STORED:
                self._stored(w, bit, event[1], event[2], event[3], event[4])
            elif kind == REMOVED:
                self._removed(w, bit, event[1])
            elif kind == CLEARED:
                self._drop_all(index, w)
        if len(w.copies) > w.feed.limit:
            w.overflows += 1
            self._drop_all(index, w)
        return APPLIED

    def restart(self, index: int, seq: int) -> None:
        """Missed batches that cannot be replayed: clear the worker, go on from ``seq``."""
        w = self._workers.get(index)
        if w is None:
            return
        self._drop_all(index, w)
        w.restarts += 1
        w.next_seq = seq

    def set_live(self, index: int, live: bool) -> None:
        w = self._workers.get(index)
        if live and w is not None:
            self.live[index] = w.feed.topic
        else:
            self.live.pop(index, None)

    def _stored(self, w: _Worker, bit: int, hashes, parent, tokens, block_size: int) -> None:
        keys, copies, holders = w.keys, w.copies, self.holders
        if parent is None:
            key = ROOT
        else:
            key = keys.get(parent)
            if key is None:                    # a chain we cannot follow: under-count, never guess
                w.orphans += len(hashes)
                return
        for i, h in enumerate(hashes):
            block = tokens[i * block_size:(i + 1) * block_size]
            if len(block) < block_size:        # malformed: keep what was whole
                return
            key = hash((key, tuple(block)))
            n = copies.get(h)
            if n is None:
                copies[h] = 1
                keys[h] = key
                holders[key] = holders.get(key, 0) | bit
            else:
                copies[h] = n + 1

    def _removed(self, w: _Worker, bit: int, hashes) -> None:
        keys, copies, holders = w.keys, w.copies, self.holders
        for h in hashes:
            if uncount(copies, h):
                drop_holder(holders, keys.pop(h), ~bit)

    def _drop_all(self, index: int, w: _Worker) -> None:
        holders, keep = self.holders, ~(1 << index)
        for key in w.keys.values():
            drop_holder(holders, key, keep)
        w.keys.clear()
        w.copies.clear()

    # -- reports -----------------------------------------------------------------------------------
    def blocks(self, index: int) -> int:
        w = self._workers.get(index)
        return len(w.copies) if w is not None else 0

    def worker_stats(self, index: int) -> dict | None:
        w = self._workers.get(index)
        if w is None:
            return None
        return {"kv_events_live": self.usable(index), "kv_blocks": len(w.copies), "kv_batches": w.batches,
                "kv_events": w.events, "kv_orphans": w.orphans, "kv_resyncs": w.resyncs,
                "kv_restarts": w.restarts, "kv_overflows": w.overflows}

    def note_resync(self, index: int) -> None:
        w = self._workers.get(index)
        if w is not None:
            w.resyncs += 1
