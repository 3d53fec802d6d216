"""A modelled vLLM engine for bench/prefix_sim.py: block prefix cache and continuous batching.

What it keeps of vLLM (v1) because routing depends on it:

- **Blocks.** The KV cache is ``cache_tokens // block`` blocks of ``block`` tokens. A request
  holds one block per ``block`` tokens of prompt plus output, for as long as it runs; a full
  prompt block is named by a chained hash and, once allocated, any later request with the same
  prefix shares it (vLLM caches a block when it is allocated, before it is computed). A finished
  request's blocks become free but stay cached, in an LRU that allocation evicts from the oldest,
  the request's last block first (vLLM frees a request's blocks in reverse). So running requests
  pin their blocks and only the rest of the cache remembers: 64 requests of 3,000 tokens fill
  most of a 145k-token cache on their own.
- **Admission.** Waiting requests start in order while the step's token budget and free blocks
  last; a request's cache hit is its longest run of cached blocks at admission (at least one
  token is always computed). Prefill is chunked to the token budget, decodes take one token.
- **Events.** With ``publish`` on, the engine tells the pool what its cache does as vLLM's KV
  events do (``mpdp/routing/kv_index.py``'s tuples): ``BlockStored`` for the blocks a request
  allocated, once the step that computes them is over (vLLM publishes a step's events when it
  ends; a request that waits in the queue, or whose prefill takes several steps, is known late),
  and ``BlockRemoved`` for each cached block allocation evicts, in the LRU order above. A step's
  events go out as one batch, a hop later. Copies of a block being computed by another request
  (``private``) are not cached, so they publish nothing.
- **Time.** A step costs the engine's CPU (scheduling, output handling, tokenizing new prompts)
  and then GPU work: per step, per computed token, per token of context a decode reads. Engines
  on one GPU share it evenly while both have a step on it (time slicing), so an idle engine
  gives the other the whole GPU.

Calibrated on the measured two-workers-one-H200 runs (bench/results/gpu-1xh200/prefix-*.json):
least_loaded on random prompts (13.0 s for 512 x 1,000 tokens, ~19k uncached tokens/s per
worker; simulated 13.4 s) and on docqa (30.5 req/s; simulated 33). Loads that are almost all
cached run too fast here (gepa8: 214 req/s against 151): some per-request cost of the real engine
is missing, so the simulation says little about them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from mpdp.routing.kv_index import REMOVED, STORED


@dataclass
class EngineModel:
    cache_tokens: int = 145_632      # what READY reported for the 20 GiB caches
    block: int = 16
    batch_tokens: int = 16_384       # max_num_batched_tokens (LLM's default on an H100-class GPU)
    max_seqs: int = 1024
    gpu_token_s: float = 24e-6       # GPU time per computed token, the whole GPU (an 8B model)
    gpu_step_s: float = 6e-3         # per step: launches and the weights read by a decode
    gpu_context_s: float = 25e-9     # per token of context a decode reads (KV bandwidth)
    cpu_step_s: float = 2e-3         # the engine's scheduling and output handling, per step ...
    cpu_seq_s: float = 40e-6         # ... and per sequence in it
    cpu_token_s: float = 1e-6        # tokenizing a new prompt, per token
    hop_s: float = 0.5e-3            # dispatcher to engine, and back to the caller
    shared_gpu: bool = True          # all engines on one GPU (the measured setup)


_VOCAB: dict[str, int] = {}


def words_of(prompt: str | None, messages: list[dict] | None) -> list[str]:
    """A prompt's tokens (words; chat rendered with role markers as a template would)."""
    if messages is not None:
        tokens = []
        for m in messages:
            tokens += ["<|im_start|>", m["role"], *m["content"].split(), "<|im_end|>"]
        return tokens + ["<|im_start|>", "assistant"]
    return prompt.split()


def token_ids(prompt: str | None, messages: list[dict] | None) -> list[int]:
    """The prompt's token ids, one a word (the pool's tokenizer in the simulation)."""
    vocab = _VOCAB
    return [vocab.setdefault(w, len(vocab)) for w in words_of(prompt, messages)]


def prompt_tokens(body: dict, block: int) -> tuple[int, tuple[int, ...], list[int]]:
    """A request's prompt length in tokens, the chained hashes of its full blocks and its token ids."""
    ids = token_ids(body.get("prompt"), body.get("messages"))
    hashes, h = [], 0
    for start in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[start:start + block])))
        hashes.append(h)
    return len(ids), tuple(hashes), ids


class _Req:
    __slots__ = ("id", "prompt", "hashes", "ids", "computed", "generated", "held", "private", "cached",
                 "fresh")

    def __init__(self, rid: int, prompt: int, hashes: tuple[int, ...], ids: list[int]):
        self.id, self.prompt, self.hashes, self.ids = rid, prompt, hashes, ids
        self.computed = self.generated = self.private = self.cached = 0
        self.held: list[int] = []
        self.fresh: deque[int] = deque()                # blocks it caches, not yet published (positions)


class Engine:
    def __init__(self, index: int, model: EngineModel, sim):
        self.index, self.model, self.sim = index, model, sim
        self.free = model.cache_tokens // model.block   # blocks holding nothing
        self.lru: OrderedDict[int, None] = OrderedDict()  # free blocks still cached, oldest first
        self.ref: dict[int, int] = {}                   # cached blocks in use -> requests using them
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.new_tokens = 0                             # prompts arrived since the last step
        self.stepping = False
        self._batch: list[tuple[_Req, int]] = []        # the step on the GPU: (request, tokens)
        self.requests = self.prompt_total = self.hit_total = self.computed_total = 0
        self.publish = False                            # KV events (the pool's event index listens)
        self.events: list[tuple] = []                   # this step's, published when it ends

    # -- requests in and out -----------------------------------------------------------------------
    def arrive(self, rid: int, tokens: tuple[int, tuple[int, ...], list[int]]) -> None:
        self.waiting.append(_Req(rid, *tokens))
        self.new_tokens += tokens[0]
        if not self.stepping:
            self._step()

    def _admit(self, r: _Req) -> bool:
        ref, lru, block = self.ref, self.lru, self.model.block
        hit = 0
        for h in r.hashes:
            if h in ref or h in lru:
                hit += 1
            else:
                break
        hit = min(hit, (r.prompt - 1) // block)         # vLLM always computes the last token
        need = -(-(r.prompt + self.sim.max_tokens) // block) - hit
        from_lru = sum(1 for h in r.hashes[:hit] if h not in ref)
        if need > self.free + len(lru) - from_lru:
            return False
        for h in r.hashes[:hit]:
            if h in ref:
                ref[h] += 1
            else:
                del lru[h]
                ref[h] = 1
        r.held = list(r.hashes[:hit])
        for pos in range(hit, len(r.hashes)):
            h = r.hashes[pos]
            self._take()
            if h in ref:                                # being computed by another request: a copy
                r.private += 1
                continue
            if h in lru:                                # a stale copy behind an evicted block: replace it
                del lru[h]
                self.free += 1
                if self.publish:
                    self.events.append((REMOVED, [h]))
            ref[h] = 1
            r.held.append(h)
            r.fresh.append(pos)
        extra = need - (len(r.hashes) - hit)
        for _ in range(extra):
            self._take()
        r.private += extra
        r.computed = r.cached = hit * block
        self.requests += 1
        self.prompt_total += r.prompt
        self.hit_total += r.computed
        self.computed_total += r.prompt - r.computed
        return True

    def _take(self) -> None:
        if self.free:
            self.free -= 1
        else:
            h, _ = self.lru.popitem(last=False)         # evict the least recently freed cached block
            if self.publish:
                self.events.append((REMOVED, [h]))

    def _release(self, r: _Req) -> None:
        ref, lru = self.ref, self.lru
        for h in reversed(r.held):                      # the tail first: evicted before the head
            n = ref[h] - 1
            if n:
                ref[h] = n
            else:
                del ref[h]
                lru[h] = None
        self.free += r.private

    # -- steps -------------------------------------------------------------------------------------
    def _step(self) -> None:
        m = self.model
        budget, batch, context = m.batch_tokens, [], 0
        for r in self.running:
            if budget <= 0:
                break
            n = min(r.prompt - r.computed, budget) if r.computed < r.prompt else 1
            if r.computed >= r.prompt:
                context += r.prompt + r.generated
            batch.append((r, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < m.max_seqs and self._admit(self.waiting[0]):
            r = self.waiting.popleft()
            self.running.append(r)
            n = min(r.prompt - r.computed, budget)
            batch.append((r, n))
            budget -= n
        if not batch:
            self.stepping = False
            return
        self.stepping = True
        self._batch = batch
        cpu = m.cpu_step_s + m.cpu_seq_s * len(batch) + m.cpu_token_s * self.new_tokens
        self.new_tokens = 0
        gpu = m.gpu_step_s + m.gpu_token_s * (m.batch_tokens - budget) + m.gpu_context_s * context
        self.sim.at(self.sim.now + cpu, self.sim.gpu, self, gpu)

    def step_done(self) -> None:
        finished = set()
        block, publish = self.model.block, self.publish
        for r, n in self._batch:
            if r.computed < r.prompt:
                r.computed += n
                if publish:
                    self._stored(r, block)
                if r.computed == r.prompt:
                    r.generated = 1                     # the prefill's last chunk samples a token
                    self.sim.first_token(r.id)
            else:
                r.generated += 1
            if r.generated >= self.sim.max_tokens:
                finished.add(r.id)
                self._release(r)
                self.sim.finished(self, r)
        if finished:
            self.running = [r for r in self.running if r.id not in finished]
        if self.events:
            self.sim.published(self, self.events)
            self.events = []
        self._step()

    def _stored(self, r: _Req, block: int) -> None:
        """BlockStored for the blocks ``r`` cached whose tokens this step computed, as vLLM's events
        carry them: the engine's hashes, the parent's hash, the token ids."""
        fresh, hashes, ids = r.fresh, r.hashes, r.ids
        while fresh and (fresh[0] + 1) * block <= r.computed:
            p = fresh.popleft()
            self.events.append((STORED, [hashes[p]], hashes[p - 1] if p else None,
                                ids[p * block:(p + 1) * block], block))
