"""The cost of routing by the engines' KV events (issue 25), for ``bench.prefix --micro``.

Three figures, on the machine it runs on:

- per event, on the listener thread: decoding vLLM's batches (msgpack, array-like layout) and
  applying them to the index: a ``BlockStored`` of a whole 3,000-token prompt (its 187 blocks of
  16 tokens, one event, as vLLM stores a prefill's blocks) and the ``BlockRemoved`` of one block
  (vLLM evicts one block per event);
- per request, on the dispatcher thread: ``choose`` + ``assigned`` + ``finished`` of
  ``cache_aware`` with the index live on both workers (the mirror is kept all the same), with the
  pending layer and without it, beside the mirror alone;
- per request, in the caller's thread: ``route_key`` with the prompt tokenized by the model's
  tokenizer (``--model``, a folder with the tokenizer), and the tokenization alone.
"""

from __future__ import annotations

import random
import time
from collections import deque

import msgpack

from mpdp.core.kv_events import decode_batch
from mpdp.engines.base import EngineRequest
from mpdp.requests import estimate_cost
from mpdp.routing import CacheAware, Ticket, WorkerLoad
from mpdp.routing.kv_index import STORED, Feed, KVIndex

BLOCK = 16


def _stored_payload(first_hash: int, tokens: list[int]) -> bytes:
    n = len(tokens) // BLOCK
    event = ["BlockStored", list(range(first_hash, first_hash + n)), None, tokens[:n * BLOCK], BLOCK, None, "GPU", None]
    return msgpack.packb([time.time(), [event], 0], use_bin_type=True)


def _removed_payload(h: int) -> bytes:
    return msgpack.packb([time.time(), [["BlockRemoved", [h], "GPU"]], 0], use_bin_type=True)


def per_event(docs: int = 64, doc_tokens: int = 3000, repeats: int = 3) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(150_000) for _ in range(doc_tokens)] for _ in range(docs)]
    blocks = doc_tokens // BLOCK
    best = None
    for _ in range(repeats):
        kv = KVIndex()
        kv.start(0, Feed("t", "ipc://x", None, BLOCK, 1 << 30))
        stored = [_stored_payload(1 + d * blocks, p) for d, p in enumerate(prompts)]
        removed = [_removed_payload(1 + i) for i in range(docs * blocks)]
        t0 = time.perf_counter()
        decoded = [decode_batch(p) for p in stored]
        t1 = time.perf_counter()
        for seq, events in enumerate(decoded):
            kv.apply(0, seq, events)
        t2 = time.perf_counter()
        decoded_r = [decode_batch(p) for p in removed]
        t3 = time.perf_counter()
        for seq, events in enumerate(decoded_r, len(decoded)):
            kv.apply(0, seq, events)
        t4 = time.perf_counter()
        assert kv.blocks(0) == 0
        row = {"stored_decode_us": (t1 - t0) / docs * 1e6, "stored_apply_us": (t2 - t1) / docs * 1e6,
               "removed_decode_us": (t3 - t2) / len(removed) * 1e6, "removed_apply_us": (t4 - t3) / len(removed) * 1e6}
        if best is None or sum(row.values()) < sum(best.values()):
            best = row
    out = {k: round(v, 2) for k, v in best.items()}
    out.update({"stored_event_blocks": blocks, "block_size": BLOCK,
                "stored_us_per_block": round((best["stored_decode_us"] + best["stored_apply_us"]) / blocks, 3)})
    return out


def per_request(text, tokenizer_model: str | None, n: int = 5000, repeats: int = 3) -> dict:
    """Dispatcher µs per request with the index live (docqa-shaped prompts on 2 workers), and the
    caller's route_key with tokenization."""
    rng = random.Random(1)
    docs = [text.words(rng, 3000) for _ in range(64)]
    reqs = [EngineRequest(i, f"{docs[rng.randrange(64)]}\n\nQuestion: {text.words(rng, 12)}?", None, None,
                          {"max_tokens": 8}) for i in range(n)]
    tokenize, source = _tokenizer(tokenizer_model)
    out: dict = {"tokenizer": source}
    # the caller's side: tokenization alone, then route_key with it
    sample = reqs[:200]
    t0 = time.perf_counter()
    ids = [tokenize(r) for r in sample]
    out["tokenize_us_per_request"] = round((time.perf_counter() - t0) / len(sample) * 1e6, 1)
    out["prompt_tokens_mean"] = round(sum(map(len, ids)) / len(ids), 1)
    policy = CacheAware(events=True)
    policy.use_kv_events(KVIndex(), tokenize, BLOCK)
    t0 = time.perf_counter()
    for r in sample:
        policy.route_key(r)
    out["route_key_us_per_request"] = round((time.perf_counter() - t0) / len(sample) * 1e6, 1)
    # the dispatcher's side: ids once (not timed), then choose + assigned + finished as the scheduler
    cache: dict[str, list[int]] = {}

    def cached_tokenize(r):
        key = r.prompt
        if key not in cache:
            cache[key] = tokenize(r)
        return cache[key]

    for pending, name in ((True, "dispatcher_us_per_request_with_events"),
                          (False, "dispatcher_us_per_request_with_events_no_pending")):
        out[name], tickets = _dispatcher_us(reqs, cached_tokenize, pending, n, repeats)
    out["exact_hits_share"] = round(sum(1 for t in tickets if t.route.predicted) / n, 3)
    return out


def _dispatcher_us(reqs, cached_tokenize, pending: bool, n: int, repeats: int):
    """Best µs per request of choose + assigned + finished with the index live (and the pending
    layer, or not), the listener's applying taken out."""
    best = None
    for _ in range(repeats):
        kv = KVIndex()
        policy = CacheAware(events=True, pending=pending)
        policy.use_kv_events(kv, cached_tokenize, BLOCK)
        workers = [WorkerLoad(i, capacity=10**6) for i in range(2)]
        for w in workers:
            feed = {"topic": f"t{w.index}", "endpoint": "ipc://x", "replay_endpoint": None, "block_size": BLOCK}
            policy.worker_added(w.index, {"kv_cache_tokens": 163_840, "extra": {"kv_events": feed}})
            kv.start(w.index, kv.wanted[w.index])
        tickets = [Ticket(i, estimate_cost(r), policy.route_key(r)) for i, r in enumerate(reqs)]
        seqs = [0, 0]
        # what the engines would have published: each document's blocks stored once on its worker
        in_flight: deque = deque()
        applying = 0.0                          # the listener's share, taken out of the figure
        t0 = time.perf_counter()
        for t in tickets:
            w = policy.choose(t, workers)
            w.in_flight[t.id] = t
            w.outstanding += t.cost
            policy.assigned(t, w.index)
            in_flight.append((w, t))
            if len(in_flight) > 128:
                w0, t0_ = in_flight.popleft()
                del w0.in_flight[t0_.id]
                w0.outstanding -= t0_.cost
                policy.finished(t0_, w0.index)
                if t0_.route.predicted == 0:     # its engine stored the prompt: the event
                    a = time.perf_counter()
                    kv.apply(w0.index, seqs[w0.index], [(STORED, list(t0_.route.exact), None,
                                                         _flat(cached_tokenize(reqs[t0_.id])), BLOCK)])
                    seqs[w0.index] += 1
                    applying += time.perf_counter() - a
        us = (time.perf_counter() - t0 - applying) / n * 1e6
        if best is None or us < best:
            best = us
    return round(best, 2), tickets


def _flat(ids: list[int]) -> list[int]:
    return ids[:(max(0, len(ids) - 1) // BLOCK) * BLOCK]


def _tokenizer(model: str | None):
    if model:
        try:
            from mpdp.core.prompt_tokens import PromptTokenizer

            return PromptTokenizer(model, {}), f"the model's tokenizer ({model})"
        except Exception as exc:  # noqa: BLE001  (fall back, and say so)
            source = f"a stand-in (the model's tokenizer did not load: {exc})"
    else:
        source = "a stand-in: one token per word (give --model for the real cost)"
    vocab: dict[str, int] = {}

    def words(req):
        return [vocab.setdefault(w, len(vocab)) for w in req.prompt.split()]

    return words, source


def micro_events(text, model: str | None, n: int = 5000, repeats: int = 3) -> dict:
    out = {"per_event": per_event(repeats=repeats), "per_request": per_request(text, model, n, repeats)}
    e, r = out["per_event"], out["per_request"]
    print(f"events: BlockStored of {e['stored_event_blocks']} blocks decode {e['stored_decode_us']:.1f} µs + "
          f"apply {e['stored_apply_us']:.1f} µs; BlockRemoved decode {e['removed_decode_us']:.2f} µs + "
          f"apply {e['removed_apply_us']:.2f} µs")
    print(f"requests: dispatcher {r['dispatcher_us_per_request_with_events']:.2f} µs with the index live "
          f"({r['dispatcher_us_per_request_with_events_no_pending']:.2f} µs without the pending layer); "
          f"caller tokenize {r['tokenize_us_per_request']:.0f} µs, route_key {r['route_key_us_per_request']:.0f} µs "
          f"({r['prompt_tokens_mean']:.0f} tokens, {r['tokenizer']})")
    return out
