"""Cache-aware routing: send a request where its prompt's prefix is already cached.

Each vLLM engine keeps a prefix cache of KV blocks; with several workers a request pays its
prompt's prefill again on every worker that has not seen that prefix. This policy mirrors, per
worker, an approximate tree of the prefixes it was sent and uses it to trade a little balance
for a lot of work saved.

**The tree.** A prompt is cut into fixed-size blocks (``block_chars`` characters of text, or
``block_tokens`` token ids) and each block is named by a chained hash: block i's hash covers
block i and, through block i-1's hash, everything before it. A set of such hashes is a prefix
tree (a hash is a node, its predecessor its parent) without pointers. Chat messages are
rendered as role + content, in order, so a system prompt and few-shot demos form the shared
prefix and only the last question differs; text, chat and token prompts start from different
seeds and never match each other (the engine renders them differently). The default block,
512 characters or 128 tokens, makes a 3,000-token prompt ~23 blocks: fine enough that at most one
block of a shared prefix goes unseen, coarse enough to keep the dispatcher's work small. The hashes are
computed in ``route_key``, in the caller's thread, and kept on the ticket; the dispatcher only
does dict lookups. Only whole blocks count, as vLLM caches only full blocks.

One dict maps each block hash to a bitmask of the workers holding it, so matching a request
against every worker at once walks its blocks in order and stops where the last worker drops
out: a miss costs one lookup, a match of k blocks k+1 lookups, whatever the number of workers or
entries. Each worker also has an LRU (``OrderedDict``) of its blocks with their token counts,
bounded by a token budget that follows the KV cache size the worker reported in READY
(``kv_cache_tokens``, times ``cache_factor``; ``default_cache_tokens`` for engines that report
none, like echo and hf). The factor is 1.5, not below 1, because the two ways to be wrong cost
differently: forgetting a prefix the engine still holds sends its next request to the least-loaded
worker, which prefills it again and evicts something of its own for it (the pool's caches stop
being disjoint and both thrash), while remembering one the engine dropped sends it home, to one
prefill there, which a miss would cost anyway. The 4-characters-a-token guess also overstates the
tokens of wordy text by up to a third, filling a budget of exactly the KV size too soon.
A request's blocks are refreshed last-first, so a prefix's first blocks are the most recent and
the tail goes first, as vLLM frees a request's blocks in reverse order. A worker that dies or
stops takes its entries with it (its cache is gone), and a worker that becomes READY starts
empty, so a restart is cold here as it is in the engine.

**The load criterion.** Load is what the worker still has to process, in tokens
(``WorkerLoad.outstanding``, the sum of its tickets' costs). A cached prefix is work the worker
will not do, so the policy charges a ticket only its uncached part: in ``choose`` it sets
``ticket.cost`` to ``cost - saved`` for the worker it picks (the scheduler then adds and later
subtracts that same figure), and keeps the full estimate on the route key for a retry.
Counting full prompt costs is what broke ``prefix_affinity``'s fixed 4,096-token slack: two
cached 3,000-token requests looked like 6,000 tokens of work when they were ~100.

For each candidate w, ``score(w) = outstanding(w) + cost - saved(w)`` is the work ahead of the
request's end on w if it goes there. Let ``m`` be the smallest score. A worker may take the
request if::

    score(w) <= m + min(band * m, worth * saved(w))

and among those the one with the longest match wins (then the smallest score, fewer requests in
flight, the lower index). Why this shape:

- with no match anywhere the allowance is 0 and the least-loaded worker wins: a miss never goes
  to "the worker with the emptiest tree" (the SGLang router's death spiral, where the cold worker
  takes every new prefix and then all of their follow-ups);
- while every candidate holds a request, a worker holding the prefix may be far behind: up to
  ``band`` (4) times the least-loaded one's work, and ``worth`` (16) tokens of queue per token the
  match saves. Under load nobody idles for an imbalance of a few requests, while each spill costs
  a whole prefill *and* a duplicate of the prefix in a second cache; keeping each prefix on one
  worker is what keeps the caches disjoint, so a working set larger than one cache but smaller
  than the pool's fits (a 0.5 band and 4x worth spilled docqa's documents at the first imbalance:
  1.77x least_loaded on the GPU, where pure affinity gave 2.5x). The caps scale with the work queued and
  with the match, so a short shared system prompt (one block) buys almost no imbalance;
- when a candidate holds nothing the allowance is 0: that worker takes the request unless another
  finishes it sooner, even if it must prefill it, so nobody idles while another queues. A hot prefix
  thus spills to a second worker when the first falls behind far enough to leave it dry, and from
  then on both hold it and plain load decides between them. At a burst's start (all empty) this
  costs at most one spill per worker, not one per prefix: as soon as a worker holds a request the
  wide allowance applies again.

Cost on the dispatcher thread: O(matched blocks) lookups in ``choose`` and O(blocks) ``OrderedDict``
operations in ``assigned``, plus O(evicted blocks); never a scan of all entries (a worker's
removal is the one O(its entries) operation). ``bench/prefix.py --micro`` measures it.

The tree is an estimate: prompt tokens are guessed at 4 characters a token for text (as
``estimate_cost`` does), the engine may have evicted sooner or later than the mirror, and two
different texts can tokenize to a shared prefix the character blocks do not see. A wrong guess
costs a prefill, never a wrong answer.

**The engines' own events** (opt-in: ``events=True``). Where the engine publishes its KV-cache
events (vLLM), the pool keeps an exact index of each worker's cached blocks from them
(``kv_index.py``, fed by the listener thread of ``core/kv_events.py``) and gives it to this policy
(``use_kv_events``, with the model's tokenizer). ``route_key`` then also tokenizes the prompt, in
the caller's thread, and keys its blocks in the engine's block size. The index knows a block only
once the engine has scheduled the request that stores it, seconds after it was sent under load; so
the prefixes of the requests sent to a worker and not yet over are kept beside it, pending on that
worker (``kv_pending.py``), and ``choose`` takes ``saved(w)`` for every worker whose index is live
from the longer of its confirmed and its pending match: the index is the truth about what is
cached (evictions included), the pending claims what is about to be. Without that layer
(``pending=False``, the first version) the followers of a new prefix found it cached nowhere until
its first request was scheduled and went by load to every worker, which then each cached it: on
one H100 with an 8B-shaped model that routed document QA at half the mirror's rate. Workers whose
events stopped, and engines without events, are matched by the mirror, with the same load rule.
The exact token count also replaces the 4-characters estimate in the ticket's cost. The mirror is
kept for every worker all the same, so that a worker whose events stop falls back to a warm one.
**Sticky** (``sticky=True``, the default with events): ``saved(w)``, the load charge and the
prediction, is the exact (or pending) match, but the *affinity* that picks among the workers within
the allowance (the ``worth * saved`` cap and the longest-match rank) is the longer of that and the
mirror's match. Once a prefix's blocks are evicted from every engine the index says "cached
nowhere", and without this its next request goes by load to either worker; the mirror remembers
where each prefix was sent (its home) and sticky keeps sending it there, while the load rule and the
predictions stay exact. ``sticky=False`` is the exact index alone. ``reported`` compares, per
worker, the cached tokens the policy predicted with those the engine reported (``stats()``).
On one H100 the event index was level with the mirror (0.985x on many tenants revisited at random,
one draw for both: both cached what one LRU cache the size of the two holds of it, as pure
affinity does in the simulation), so it buys exact accounting, not speed, and the mirror stays the
default (``bench/RESULTS.md``, "third lease").
"""

from __future__ import annotations

from collections import OrderedDict

from mpdp.routing.kv_index import KVIndex, block_keys, cacheable_blocks, feed_from_ready, longest_matches
from mpdp.routing.kv_pending import PendingBlocks
from mpdp.routing.policies import RoutingPolicy, load_key
from mpdp.routing.tickets import Ticket, WorkerLoad

# Seeds of the hash chains: the same characters as a plain prompt, as chat or as token ids are
# different inputs to the engine (chat goes through the template) and must not match each other.
_TEXT_SEED = hash("mpdp.cache_aware.text")
_CHAT_SEED = hash("mpdp.cache_aware.chat")
_TOKEN_SEED = hash("mpdp.cache_aware.tokens")
# Separators in the rendered chat text: a role name can never run into its content.
_ROLE_OPEN, _ROLE_CLOSE, _MESSAGE_END = "\x1e", "\x1f", "\x1d"


def _first(item):
    return item[0]


class PrefixKey:
    """What ``route_key`` leaves on a ticket: the prompt's block hashes, what a block is worth in
    tokens, and (set at the first ``choose``) the ticket's full cost, kept for retries. With the
    engines' events: the keys of its blocks in the engine's block units (``exact``) and its
    prompt length in tokens, and the keys its pending claim is kept at (``marks``); ``choose``
    leaves the cached tokens it predicted on the worker it picked, and whether that came from the
    exact index; ``assigned`` the claim it made and the worker's applied event batches then."""

    __slots__ = ("blocks", "block_tokens", "cost", "exact", "prompt_tokens", "predicted", "predicted_exact",
                 "marks", "claim", "batches_at")

    def __init__(self, blocks: tuple[int, ...], block_tokens: int):
        self.blocks = blocks
        self.block_tokens = block_tokens
        self.cost: int | None = None
        self.exact: tuple[int, ...] = ()
        self.prompt_tokens: int | None = None
        self.predicted: int | None = None
        self.predicted_exact = False
        self.marks: tuple[int, ...] = ()
        self.claim: tuple[int, int] | None = None
        self.batches_at: int | None = None

    def __repr__(self) -> str:
        return f"PrefixKey({len(self.blocks)} blocks of {self.block_tokens} tokens)"


def text_blocks(text: str, block_chars: int, seed: int = _TEXT_SEED) -> tuple[int, ...]:
    """Chained hashes of the whole ``block_chars``-character blocks of ``text``."""
    out, h = [], seed
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start:start + block_chars]))
        out.append(h)
    return tuple(out)


def token_blocks(ids: list[int], block_tokens: int) -> tuple[int, ...]:
    """Chained hashes of the whole ``block_tokens``-id blocks of ``ids``."""
    out, h = [], _TOKEN_SEED
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        h = hash((h, tuple(ids[start:start + block_tokens])))
        out.append(h)
    return tuple(out)


def render_messages(messages: list[dict]) -> str:
    """Role and content of each message, in order: the shared system prompt and demos come first."""
    parts = []
    for m in messages:
        parts += (_ROLE_OPEN, m["role"], _ROLE_CLOSE, m["content"], _MESSAGE_END)
    return "".join(parts)


class CacheAware(RoutingPolicy):
    """Route to the worker holding the longest cached prefix, within a load allowance (module doc).

    ``block_chars`` / ``block_tokens``: the block size for text and for token prompts (a text
    block counts as ``block_chars // 4`` tokens). ``band``: how much further behind than the
    least-loaded worker, relative to its queued work, a worker holding the prefix may be.
    ``worth``: tokens of extra queue accepted per token the match saves. ``cache_factor``: the
    mirror's token budget per worker as a multiple of its reported KV cache (above 1 on purpose,
    module doc). ``default_cache_tokens``: the budget when a worker reports none.
    ``events``: route by the engines' KV events where the pool has them (vLLM; off by default, see
    the module doc). ``pending``: with events, count the prefixes sent to a worker and not yet over
    as cached there (``kv_pending.py``); ``pending_stride``: the claims' granularity, in engine blocks.
    ``sticky``: with events, the affinity among workers is the longer of the exact and the mirror's
    match, the charge the exact one (module doc); ``False`` routes by the exact index alone.
    The defaults were tuned on ``bench/prefix_sim.py`` (a simulation of the measured runs).
    """

    def __init__(self, block_chars: int = 512, block_tokens: int = 128, band: float = 4.0,
                 worth: float = 16.0, cache_factor: float = 1.5, default_cache_tokens: int = 262_144,
                 events: bool = False, pending: bool = True, pending_stride: int = 1, sticky: bool = True):
        if block_chars < 4 or block_tokens < 1 or pending_stride < 1:
            raise ValueError("block_chars must be >= 4, block_tokens and pending_stride >= 1")
        if band < 0 or worth < 0 or not cache_factor > 0 or default_cache_tokens < 1:
            raise ValueError("band and worth must be >= 0, cache_factor > 0, default_cache_tokens >= 1")
        self.block_chars = block_chars
        self.block_tokens = block_tokens
        self.band = band
        self.worth = worth
        self.cache_factor = cache_factor
        self.default_cache_tokens = default_cache_tokens
        self._holders: dict[int, int] = {}                   # block hash -> bitmask of worker indices
        self._lru: dict[int, OrderedDict[int, int]] = {}      # worker -> {block hash: tokens}, oldest first
        self._used: dict[int, int] = {}                       # worker -> tokens its blocks stand for
        self._budget: dict[int, int] = {}                     # worker -> token budget
        # The engines' events (``use_kv_events``); ``events=False`` keeps the mirror alone.
        self.wants_kv_events = events
        self.kv: KVIndex | None = None
        self.kv_block_size = 16
        self._tokenize = None
        self.pending_stride = pending_stride
        self.sticky = sticky
        self._pending: PendingBlocks | None = PendingBlocks(pending_stride) if pending else None
        self._reports: dict[int, list[int]] = {}              # worker -> counters (see reported)

    def use_kv_events(self, index: KVIndex, tokenize, block_size: int) -> None:
        """Route by ``index`` where it is live; ``tokenize(request)`` gives a prompt's token ids.
        Workers the index already follows (a policy that replaces another on a running pool) take
        pending claims from now on, as those announced later at READY will."""
        self.kv, self._tokenize, self.kv_block_size = index, tokenize, block_size
        if self._pending is not None:
            for i in list(index.wanted):
                if not self._pending.has_worker(i):
                    self._pending.add_worker(i)

    # -- the caller's thread: reads only the policy's (immutable) settings -----------------------
    def route_key(self, request) -> PrefixKey | None:
        if request.prompt_token_ids is not None:
            blocks, tokens = token_blocks(request.prompt_token_ids, self.block_tokens), self.block_tokens
        elif request.messages is not None:
            blocks = text_blocks(render_messages(request.messages), self.block_chars, _CHAT_SEED)
            tokens = self.block_chars // 4
        elif request.prompt is not None:
            blocks, tokens = text_blocks(request.prompt, self.block_chars), self.block_chars // 4
        else:
            return None
        key = PrefixKey(blocks, tokens)
        if self._tokenize is not None:
            ids = self._tokenize(request)
            if ids is not None:
                size = self.kv_block_size
                key.exact = block_keys(ids, size, cacheable_blocks(len(ids), size))
                key.prompt_tokens = len(ids)
                s = self.pending_stride
                key.marks = key.exact[s - 1::s] if s > 1 else key.exact
                params = request.params
                max_tokens = params.get("max_tokens", 16)
                if type(max_tokens) is int:        # "context": the pool's estimate (its guess) stays
                    key.cost = 1 + len(ids) + max_tokens * params.get("n", 1)
        return key if blocks or key.exact else None

    # -- the dispatcher thread --------------------------------------------------------------------
    def matches(self, key: PrefixKey, candidates: list[WorkerLoad]) -> dict[int, int]:
        """Cached blocks of ``key`` on each candidate (by index) in the mirror, walking the blocks once for all."""
        return longest_matches(self._holders, key.blocks, [w.index for w in candidates])

    def _exact_workers(self, key: PrefixKey, candidates: list[WorkerLoad]) -> list[int]:
        """The candidates whose exact index is live, when the key has exact blocks."""
        kv = self.kv
        if kv is None or not key.exact:
            return []
        size = self.kv_block_size
        return [w.index for w in candidates if kv.usable(w.index, size)]

    def choose(self, ticket: Ticket, candidates: list[WorkerLoad]) -> WorkerLoad:
        key = ticket.route
        if key.__class__ is not PrefixKey:
            return min(candidates, key=load_key)
        cost = key.cost
        if cost is None:
            cost = key.cost = ticket.cost          # the full estimate, before any discount
        # Without the engines' events (the default) no call: this runs once per request.
        exact = self._exact_workers(key, candidates) if self.kv is not None else ()
        pending = self._pending if exact else None
        if pending is not None:
            kv = self.kv
            for i in exact:
                pending.drain(i, kv.batches(i))
            if not key.marks or not pending.holders.get(key.marks[0]):
                pending = None                     # pending nowhere
        if ((not key.blocks or not self._holders.get(key.blocks[0]))
                and (not exact or (pending is None and not self.kv.holders.get(key.exact[0])))):
            # Cached nowhere (most fresh prompts): a lookup or two, then plain least loaded.
            ticket.cost = cost
            key.predicted, key.predicted_exact = 0, bool(exact)
            return min(candidates, key=load_key)
        depth = self.matches(key, candidates) if key.blocks else dict.fromkeys((w.index for w in candidates), 0)
        bt = key.block_tokens
        if exact:
            exact_depth = self.kv.match(key.exact, exact)
            if pending is not None:                # confirmed or about to be: the longer match
                for i, d in pending.match(key.marks, exact).items():
                    if d > exact_depth[i]:
                        exact_depth[i] = d
            size = self.kv_block_size
            # The mirror's blocks are not the engine's (4 characters a token for text): capped at
            # the prompt's cacheable tokens, a prefix the mirror remembers on its old home ties,
            # never outranks, the same prefix confirmed whole on another worker.
            cacheable = len(key.exact) * size
        sticky = self.sticky
        scored = []
        for w in candidates:
            # saved can exceed the prompt estimate slightly (chat role markers): keep a cost >= 1.
            if exact and w.index in exact_depth:
                saved = min(exact_depth[w.index] * size, cost - 1)
                # near: the affinity. Sticky, it also counts where the prefix was sent (the mirror),
                # so a prefix evicted everywhere still goes home; saved, the charge, stays exact.
                near = depth[w.index] * bt if sticky else 0
                near = min(near, cacheable, cost - 1) if near > saved else saved
            else:
                saved = near = min(depth[w.index] * bt, cost - 1)
            scored.append((w.outstanding + cost - saved, saved, near, w))
        least = min(scored, key=_first)[0]
        band, worth = self.band * least, self.worth
        if any(not w.in_flight for w in candidates):
            band = 0                               # an idle worker takes the request: nobody idles
        best = best_rank = None
        for score, saved, near, w in scored:
            if score > least + min(band, worth * near):
                continue
            rank = (-near, score, len(w.in_flight), w.index)
            if best_rank is None or rank < best_rank:
                best, best_rank = (saved, w), rank
        saved, w = best
        ticket.cost = cost - saved
        key.predicted, key.predicted_exact = saved, w.index in exact
        return w

    def assigned(self, ticket: Ticket, index: int) -> None:
        key = ticket.route
        if key.__class__ is not PrefixKey:
            return
        if key.exact and self.kv is not None:
            key.batches_at = self.kv.batches(index)
            pending = self._pending
            if pending is not None and key.marks:
                if key.claim is not None:          # a retry: give back the claim where it was
                    pending.release(key.claim, key.marks)
                key.claim = pending.claim(index, key.marks)
        lru = self._lru.get(index)
        if lru is None:
            return
        holders, bit, tokens = self._holders, 1 << index, key.block_tokens
        added = 0
        # Last block first: the prefix's head ends up most recent and is evicted last.
        for h in reversed(key.blocks):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = tokens
                holders[h] = holders.get(h, 0) | bit
                added += tokens
        if added:
            used = self._used[index] + added
            budget = self._budget[index]
            while used > budget and lru:
                h, t = lru.popitem(last=False)
                used -= t
                rest = holders[h] & ~bit
                if rest:
                    holders[h] = rest
                else:
                    del holders[h]
            self._used[index] = used

    def finished(self, ticket: Ticket, index: int) -> None:
        key = ticket.route
        if key.__class__ is PrefixKey and key.claim is not None:
            # Its blocks are stored (or it was aborted): the claim waits for the worker's next batch.
            self._pending.finish(key.claim, key.marks, self.kv.batches(index))
            key.claim = None
            self._pending.drain(index, self.kv.batches(index))

    def worker_added(self, index: int, info: dict) -> None:
        self.worker_removed(index)                 # READY again means a fresh engine: a cold cache
        reported = info.get("kv_cache_tokens") if info else None
        size = reported if isinstance(reported, int) and reported > 0 else self.default_cache_tokens
        self._budget[index] = max(1, int(size * self.cache_factor))
        self._lru[index] = OrderedDict()
        self._used[index] = 0
        if self.kv is not None:
            feed = feed_from_ready(info)
            self.kv.want(index, feed)              # None: an engine without events
            if feed is not None:
                self.kv_block_size = feed.block_size   # the engine's, should options not have named it
                if self._pending is not None:
                    self._pending.add_worker(index)

    def worker_removed(self, index: int) -> None:
        if self.kv is not None:
            self.kv.want(index, None)
        if self._pending is not None:
            self._pending.remove_worker(index)
        lru = self._lru.pop(index, None)
        self._used.pop(index, None)
        self._budget.pop(index, None)
        if not lru:
            return
        holders, keep = self._holders, ~(1 << index)
        for h in lru:
            rest = holders[h] & keep
            if rest:
                holders[h] = rest
            else:
                del holders[h]

    def reported(self, ticket: Ticket, index: int, prompt_tokens: int, cached_tokens: int) -> None:
        """The engine said how much of the prompt it found cached: count it against the prediction,
        and tell the event index when the request must have stored new blocks (stale events show)."""
        r = self._reports.get(index)
        if r is None:
            r = self._reports[index] = [0] * 7       # requests, prompt, cached; exact, within; mirror, within
        r[0] += 1
        r[1] += prompt_tokens
        r[2] += cached_tokens
        key = ticket.route
        if key.__class__ is PrefixKey and key.predicted is not None:
            within = abs(key.predicted - cached_tokens) < self.kv_block_size
            if key.predicted_exact:
                r[3] += 1
                r[4] += within
            else:
                r[5] += 1
                r[6] += within
        kv = self.kv
        if kv is not None and key.__class__ is PrefixKey and key.batches_at is not None:
            # New blocks were stored after it was sent, so a batch must have come since; when none
            # was applied, it is on its way or the events stopped (the listener waits stale_s).
            feed = kv.wanted.get(index)
            if (feed is not None and prompt_tokens // feed.block_size > cached_tokens // feed.block_size
                    and kv.batches(index) == key.batches_at):
                kv.expect(index, key.batches_at)

    def worker_stats(self, index: int) -> dict:
        """Per worker, for ``stats()``: reuse the engine reported, and how well it was predicted."""
        r = self._reports.get(index, [0] * 7)
        out = {"predicted_exact": r[3], "predicted_exact_within_block": r[4],
               "predicted_mirror": r[5], "predicted_mirror_within_block": r[6]}
        if self.kv is not None:
            out.update(self.kv.worker_stats(index) or {})
            if self._pending is not None:
                out["kv_pending_keys"] = self._pending.keys(index)
                out["kv_pending_draining"] = self._pending.draining(index)
        return out

    # -- for tests and reports --------------------------------------------------------------------
    def cached_tokens(self, index: int) -> int:
        return self._used.get(index, 0)

    def entries(self) -> int:
        return len(self._holders)
