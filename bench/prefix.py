"""Routing policies on shared-prefix loads: least_loaded, prefix_affinity, cache_aware (issues 16, 25).

One pool, every policy on fresh prompts in the same run (so the engines, their warm-up and their
GPU are the same for all), several rounds, the policies' order rotated each round:

    python -m bench.prefix --engine vllm --model MODEL_FOLDER --load-format dummy --gpus 0,0 \\
        --kv-cache-memory-bytes 21474836480 --json out/prefix.json
    python -m bench.prefix --engine echo --json out/prefix-echo.json --scale 0.05   # CPU smoke test
    python -m bench.prefix --micro --json out/prefix-micro.json                      # dispatcher cost

Workloads (``--workloads``; sizes at ``--scale 1``):
  docqa    64 documents of ~3,000 tokens x 8 questions, shuffled (plain prompts)
  gepa64   chat: 64 candidate programs, each a ~3,000-token system instruction plus few-shot demos
           (user/assistant pairs), x 8 questions: prefixes outgrow one worker's cache, fit the pool's
  gepa8    chat: 8 candidate programs (~2,000-token prefixes) x 64 questions: fits every cache
  random   512 prompts of ~1,000 tokens sharing no prefix
  skew     one hot ~3,000-token document takes half the requests; the other half is docqa-shaped
  tenants  ``--tenants`` (100) tenants, each a ~``--tenant-tokens`` (6,000) context, ``--tenant-requests``
           (480) questions, each to a tenant drawn at random with weight 1/rank^``--tenant-skew``
           (0.6): a working set of ~2x the pool's KV caches at 20 GiB a worker for a Qwen3-8B shape
           (2 x 145,632 tokens), whose hot part fits; the engines evict in an order a mirror cannot see
  chat     multi-turn chat: ``--conversations`` (128) conversations of ``--turns`` (6) turns, each a
           ~300-token system prompt, then user (~60-150 tokens) and pre-written assistant (~100-200)
           turns; turn k sends the history up to user turn k, so it extends turn k-1's prompt. A
           caller holds one conversation and sends its turns one after another, each once the
           previous one has finished (as a user would); conversations interleave across callers, and
           with as many conversations as callers the load is as concurrent as the others. The last
           turns (~1,700 tokens each) outgrow one worker's cache at 20 GiB (8B shape), fit the pool's
Every request asks for ``--max-tokens`` (8) tokens with ``ignore_eos``, so generation is cheap and
fixed. ``--threads`` (128) callers each submit one request and wait for it (a closed loop; for
``chat`` a whole conversation, turn after turn);
``--stream`` streams each request, so that the time to its first text (TTFT) is measured.

**Policies.** ``--policies`` takes names with options: ``cache_aware`` routes by its mirror (the
default), ``cache_aware:events=true`` by the engines' KV events where the pool has them (vLLM), with
the prefixes sent and not yet confirmed pending on their worker, and
``cache_aware:events=true+pending=false`` by the confirmed events alone (the first version), so
``least_loaded,cache_aware,cache_aware:events=true+pending=false,cache_aware:events=true`` compares
least loaded, the mirror and both event versions in one run. Per run the JSON has P50/P90 latency (and TTFT with ``--stream``), the
prompt tokens the engines reported cached (``Completion.cached_tokens``) and, from ``stats()``,
how many of the router's predictions were within one KV block of the engine's report.

Prompts are random common English words (one BPE token each, mostly, with their leading space); when
the model folder has a ``tokenizer.json``, the words per token are measured on it so that "3,000
tokens" is 3,000 of the model's tokens; otherwise 4 characters count as one token (the echo engine
and mpdp's own cost estimate).

Per run the JSON has: requests/s, seconds, per worker the requests, prompt tokens, *busy seconds*
(the union of the intervals during which it held a request of the run: an idle worker while the
other is busy shows as a short busy time) and what vLLM itself logged while the run went on.

**Prefix-cache hit rate.** vLLM counts prefix-cache queries and hits in its engine process (its
Prometheus counters and its ``LoggingStatLogger``), which mpdp does not expose: the pool has no way
to read them. With ``--engine vllm`` this script therefore passes ``disable_log_stats=False`` and
``VLLM_LOG_STATS_INTERVAL`` (1 s) to the engines, and reads each worker's log for vLLM's own
"Prefix cache hit rate: X%" lines (a rolling rate over that engine's most recent requests, so it
mixes the previous run in at the start of a run; the last line of a run is the closest to it) and
"GPU KV cache usage". If no such line appears (a vLLM that does not log stats from
``LLMEngine.step``), the fields are null and the summary says so.

**Switching policies.** A pool's routing is fixed at construction, and starting two vLLM engines
takes minutes, so between runs (nothing in flight) this script swaps the policy of the running pool:
the pool's ``_policy`` (route keys at submit) and its scheduler's ``policy``, and tells the new
policy about every worker as READY would. This reaches into private attributes and is for this
benchmark only; each new policy starts with an empty tree, as a fresh pool's would.

``--micro``: the dispatcher-side cost of routing, no pool: µs per ``choose`` + ``assigned`` (+ the
``finished`` bookkeeping) for each policy over docqa-shaped 3,000-token prompts on 2 workers, and
the caller-thread cost of ``route_key``; then routing by KV events (``bench/prefix_events.py``): µs per
event on the listener thread, per request on the dispatcher with the index live, and the
caller's tokenization with ``--model``'s tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import mpdp
from mpdp.engines.base import EngineRequest
from mpdp.requests import estimate_cost
from mpdp.routing import POLICIES, Ticket, WorkerLoad

POLICY_NAMES = ("least_loaded", "prefix_affinity", "cache_aware")
WORKLOADS = ("docqa", "gepa64", "gepa8", "random", "skew", "tenants", "chat")
# A request's keys for this script alone (a chat's conversation and turn), never sent to the pool.
BENCH_KEYS = ("conversation", "turn")

# Common English words; nearly every one is a single token (with its leading space) in BPE vocabularies.
WORDS = """the of and to in is was for on that with as by at from his her they this are be or had an
which not have one were all their but been has there more can who will would when other some time new
about year two first into only also after over most many made these may years such than people city
world state school work part could between during under since three long family both while through
where later life game work play music group house name team number second found small each great
water world place large general early public system power used family best own small high point book
river field history country night story north south west east form local river court party found road
land black white light money order rate level market price value paper plan design model energy plant
church club union army force space train green blue color film song radio press page line word letter
""".split()
WORD_LIST = sorted(set(WORDS))


# -- prompts -------------------------------------------------------------------------------------
class Text:
    """Random text of a given token length: ``words_per_token`` from the model's tokenizer, or 4
    characters a token."""

    def __init__(self, model: str | None, engine: str):
        self.words_per_token, self.source = self._calibrate(model, engine)

    @staticmethod
    def _calibrate(model, engine):
        path = Path(model) / "tokenizer.json" if model else None
        if engine == "vllm" and path is not None and path.is_file():
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(path))
                rng = random.Random(0)
                sample = " ".join(rng.choice(WORD_LIST) for _ in range(4000))
                n = len(tok.encode(sample, add_special_tokens=False).ids)
                return 4000 / n, f"measured on {path.name}: {n / 4000:.3f} tokens a word"
            except Exception as exc:   # noqa: BLE001  (a tokenizer we cannot read: fall back, say so)
                return None, f"4 characters a token (tokenizer unreadable: {exc})"
        return None, "4 characters a token"

    def words(self, rng: random.Random, tokens: int) -> str:
        if self.words_per_token is not None:
            return " ".join(rng.choice(WORD_LIST) for _ in range(max(1, round(tokens * self.words_per_token))))
        out, chars = [], 0
        while chars < tokens * 4:
            w = rng.choice(WORD_LIST)
            out.append(w)
            chars += len(w) + 1
        return " ".join(out)


def docqa(text: Text, rng, docs: int, questions: int, doc_tokens: int) -> list[dict]:
    out = []
    for d in range(docs):
        body = text.words(rng, doc_tokens)
        for q in range(questions):
            out.append({"prompt": f"Document {d}:\n{body}\n\nQuestion: {text.words(rng, 12)}?\nAnswer:"})
    rng.shuffle(out)
    return out


def gepa(text: Text, rng, programs: int, questions: int, prefix_tokens: int, demos: int = 3) -> list[dict]:
    """DSPy/GEPA-shaped chat: per candidate program a system instruction and few-shot demos (the
    shared prefix), then one question."""
    out = []
    demo_tokens = 120
    for p in range(programs):
        instruction = text.words(rng, max(16, prefix_tokens - demos * 2 * demo_tokens))
        shots = []
        for _ in range(demos):
            shots += [{"role": "user", "content": f"Question: {text.words(rng, demo_tokens)}?"},
                      {"role": "assistant", "content": f"Answer: {text.words(rng, demo_tokens)}"}]
        system = {"role": "system", "content": f"Program {p}. {instruction}"}
        for q in range(questions):
            out.append({"messages": [system, *shots,
                                     {"role": "user", "content": f"Question: {text.words(rng, 16)}?"}]})
    rng.shuffle(out)
    return out


def random_prompts(text: Text, rng, n: int, tokens: int) -> list[dict]:
    return [{"prompt": f"{i}: {text.words(rng, tokens)}"} for i in range(n)]


def skew(text: Text, rng, n: int, doc_tokens: int, questions: int) -> list[dict]:
    hot = text.words(rng, doc_tokens)
    out = [{"prompt": f"Document hot:\n{hot}\n\nQuestion: {text.words(rng, 12)}?\nAnswer:"} for _ in range(n // 2)]
    out += docqa(text, rng, max(1, (n - n // 2) // questions), questions, doc_tokens)
    rng.shuffle(out)
    return out


def tenants(text: Text, rng, count: int, context_tokens: int, n: int, skew: float) -> list[dict]:
    """Many tenants with long contexts, revisited in random order, the popular ones more often."""
    contexts = [text.words(rng, context_tokens) for _ in range(count)]
    weights = [1 / (rank + 1) ** skew for rank in range(count)]
    picks = rng.choices(range(count), weights=weights, k=n)
    return [{"prompt": f"Tenant {t}:\n{contexts[t]}\n\nQuestion: {text.words(rng, 12)}?\nAnswer:"} for t in picks]


def chat(text: Text, rng, conversations: int, turns: int, scale: float) -> list[dict]:
    """Multi-turn chats: per conversation a system prompt, then user and (pre-written) assistant
    turns; the request for turn k carries the history up to user turn k. Conversations in a random
    order, each one's turns in order (``conversation`` and ``turn`` keep them so: see ``sessions``)."""
    tokens = lambda low, high: max(4, round(rng.randint(low, high) * scale))   # noqa: E731
    out = []
    for c in rng.sample(range(conversations), conversations):
        history = [{"role": "system", "content": f"Conversation {c}. {text.words(rng, max(16, round(300 * scale)))}"}]
        for k in range(turns):
            if k:
                history.append({"role": "assistant", "content": text.words(rng, tokens(100, 200))})
            history.append({"role": "user", "content": f"{text.words(rng, tokens(60, 150))}?"})
            out.append({"messages": list(history), "conversation": c, "turn": k})
    return out


def sessions(requests: list[dict]) -> list[list[int]]:
    """What one caller sends in a row, as indices into ``requests``: a conversation's turns in turn
    order (a chat's ``conversation`` key), any other request alone; in the order of first appearance,
    so a workload without conversations is sent in its own order."""
    out: list[list[int]] = []
    by_key: dict = {}
    for i, r in enumerate(requests):
        key = r.get("conversation")
        if key is None:
            out.append([i])
        elif key in by_key:
            by_key[key].append(i)
        else:
            by_key[key] = [i]
            out.append(by_key[key])
    for job in by_key.values():
        job.sort(key=lambda i: requests[i].get("turn", 0))
    return out


def fresh(requests: list[dict], run: int) -> list[dict]:
    """The same requests under a tag of their own at the very front (``Run 7.``), so that one run
    finds nothing of an earlier run in the engines' caches (a block's hash chains from the first
    block on) while every policy of a round sees the same workload: the same tenants drawn in the
    same order, the same documents, the same turns. Drawing a new workload for each policy made the
    draw's own difficulty part of the comparison (on the tenants load, the pooled LRU hit rate of
    the three policies' draws differed by 5 points, as much as their results did)."""
    tag = f"Run {run}. "
    out = []
    for r in requests:
        r = dict(r)
        if "prompt" in r:
            r["prompt"] = tag + r["prompt"]
        else:
            first, *rest = r["messages"]
            r["messages"] = [{**first, "content": tag + first["content"]}, *rest]
        out.append(r)
    return out


def build(workload: str, text: Text, seed: int, scale: float, args) -> list[dict]:
    rng = random.Random(seed)
    s = lambda x, low=1: max(low, round(x * scale))   # noqa: E731
    if workload == "docqa":
        return docqa(text, rng, s(args.docs, 2), args.questions, s(args.doc_tokens, 64))
    if workload == "gepa64":
        return gepa(text, rng, s(64, 2), args.questions, s(args.doc_tokens, 64))
    if workload == "gepa8":
        return gepa(text, rng, 8, s(64, 2), s(2000, 64))
    if workload == "random":
        return random_prompts(text, rng, s(args.docs * args.questions, 4), s(args.random_tokens, 16))
    if workload == "skew":
        return skew(text, rng, s(args.docs * args.questions, 4), s(args.doc_tokens, 64), args.questions)
    if workload == "tenants":
        return tenants(text, rng, s(args.tenants, 2), s(args.tenant_tokens, 64), s(args.tenant_requests, 4),
                       args.tenant_skew)
    if workload == "chat":
        return chat(text, rng, s(args.conversations, 2), args.turns, scale)
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


# -- the pool ------------------------------------------------------------------------------------
def parse_settings(items) -> dict:
    """``key=value`` items as keyword arguments, each value read as JSON (``band=4``, ``slack=0.5``)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            raise SystemExit(f"{item!r}: the value after = must be JSON (a number, true/false, ...)") from None
    return out


def make_policy(spec: str):
    """A policy from ``name`` or ``name:key=value+...``: e.g. ``prefix_affinity:slack=1000000000``
    is pure affinity (load ignored), ``prefix_affinity:slack=0`` affinity only among equally loaded
    workers (in effect least_loaded)."""
    name, _, opts = spec.partition(":")
    if name not in POLICIES:
        raise SystemExit(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    kwargs = parse_settings(filter(None, opts.split("+")))
    try:
        return POLICIES[name](**kwargs)
    except TypeError as exc:
        raise SystemExit(f"bad options for {name}: {exc}") from None


def set_routing(pool, spec: str) -> None:
    """Swap the running pool's policy (nothing in flight). Bench only: private attributes."""
    policy = make_policy(spec)
    for w in pool.stats()["workers"]:
        if w["alive"]:
            policy.worker_added(w["index"], {"kv_cache_tokens": w.get("kv_cache_tokens"),
                                             "max_model_len": w.get("max_model_len")})
    events = getattr(pool, "_kv_events", None)   # the pool's event index lives on across policies
    if events is not None and getattr(policy, "wants_kv_events", False):
        feeds = list(events.index.wanted.values())
        policy.use_kv_events(events.index, events.tokenize, feeds[0].block_size if feeds else 16)
    pool._policy = policy
    pool._dispatcher.scheduler.policy = policy


def log_paths(pool) -> dict[int, str | None]:
    """Each worker's log file (the local launcher keeps one per worker). Private attributes."""
    out = {}
    for slot in pool._dispatcher.slots:
        handle = getattr(slot, "handle", None)
        out[slot.index] = getattr(handle, "log_path", None)
    return out


def log_sizes(paths: dict) -> dict[int, int]:
    sizes = {}
    for i, p in paths.items():
        try:
            sizes[i] = os.path.getsize(p) if p else 0
        except OSError:
            sizes[i] = 0
    return sizes


HIT = re.compile(r"Prefix cache hit rate: ([\d.]+)%")
USAGE = re.compile(r"KV cache usage: (?:active )?([\d.]+)%")
PROMPT_TPUT = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s")


def engine_log(paths: dict, start: dict[int, int]) -> dict[int, dict]:
    """vLLM's own stats lines each worker logged since ``start`` (byte offsets)."""
    out = {}
    for i, p in paths.items():
        rates, usage, tput = [], [], []
        if p:
            try:
                with open(p, "rb") as f:
                    f.seek(start.get(i, 0))
                    for line in f.read().decode("utf-8", "replace").splitlines():
                        if (m := HIT.search(line)):
                            rates.append(float(m.group(1)))
                            if (u := USAGE.search(line)):
                                usage.append(float(u.group(1)))
                            if (t := PROMPT_TPUT.search(line)):
                                tput.append(float(t.group(1)))
            except OSError:
                pass
        out[i] = {"stats_lines": len(rates),
                  "prefix_cache_hit_rate_last_pct": rates[-1] if rates else None,
                  "prefix_cache_hit_rate_max_pct": max(rates) if rates else None,
                  "kv_cache_usage_max_pct": max(usage) if usage else None,
                  "prompt_tokens_per_s_mean": statistics.fmean(tput) if tput else None}
    return out


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def run_once(pool, requests: list[dict], threads: int, max_tokens: int, stream: bool = False) -> dict:
    """``threads`` callers, each submitting one request and waiting for it, until all are done; a
    chat's turns by one caller, one after another (``sessions``)."""
    bodies = [{k: v for k, v in r.items() if k not in BENCH_KEYS} for r in requests]
    it = iter(sessions(requests))
    lock = threading.Lock()
    records: list[tuple[float, float, int, int]] = []
    extra: list[tuple] = []          # (TTFT or None, cached tokens, request index) per request
    errors: list[str] = []
    params = {"max_tokens": max_tokens, "temperature": 0.0}
    if pool.engine == "vllm":
        params["ignore_eos"] = True

    def client():
        mine, mine_extra = [], []
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                break
            for i in job:
                t0 = time.perf_counter()
                first = None
                try:
                    if stream:
                        s = pool.stream(**bodies[i], **params)
                        for _ in s:
                            if first is None:
                                first = time.perf_counter() - t0
                        c = s.result()
                    else:
                        c = pool.submit(**bodies[i], **params).result()
                except Exception as exc:  # noqa: BLE001  (counted and reported, the run goes on)
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                mine.append((t0, time.perf_counter(), c.worker, c.prompt_tokens))
                mine_extra.append((first, getattr(c, "cached_tokens", None), i))
        with lock:
            records.extend(mine)
            extra.extend(mine_extra)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    t0 = time.perf_counter()
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    elapsed = time.perf_counter() - t0
    per_worker: dict[int, dict] = {}
    for a, b, w, pt in records:
        d = per_worker.setdefault(w, {"requests": 0, "prompt_tokens": 0, "intervals": []})
        d["requests"] += 1
        d["prompt_tokens"] += pt
        d["intervals"].append((a, b))
    for d in per_worker.values():
        d["busy_s"] = round(busy_seconds(d.pop("intervals")), 4)
    latencies = sorted(b - a for a, b, _, _ in records)
    ttfts = sorted(f for f, *_ in extra if f is not None)
    reported = [c for _, c, _ in extra if c is not None]
    routes, spread = route_record(requests, records, extra, t0)
    prompt = sum(pt for *_, pt in records)
    return {"requests": len(records), "errors": len(errors), "error_sample": errors[:3],
            "seconds": round(elapsed, 3), "requests_per_s": round(len(records) / elapsed, 2),
            "latency_p50_s": _quantile(latencies, 0.5), "latency_p90_s": _quantile(latencies, 0.9),
            "ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p90_s": _quantile(ttfts, 0.9),
            "cached_tokens": sum(reported) if reported else None, "prompt_tokens": prompt,
            "cached_share": round(sum(reported) / prompt, 4) if reported and prompt else None,
            "workers": {str(k): v for k, v in sorted(per_worker.items())}, "spread": spread, "routes": routes}


def group_of(request: dict) -> str:
    """What a request shares its long prefix with: its prompt's first line ("Tenant 7:", "Document
    3:"), or a chat's first message (a program's or a conversation's system prompt)."""
    if "prompt" in request:
        return request["prompt"].split("\n", 1)[0][:40]
    messages = request.get("messages") or [{}]
    return str(messages[0].get("content", ""))[:40]


def route_record(requests: list[dict], records: list, extra: list, t0: float) -> tuple[list, dict]:
    """Per request, in start order: [start s, group, worker, prompt tokens, cached tokens]; and how
    the groups spread over the workers: how many were served by more than one, and how often a
    group's next request went to another worker than its last (a "move")."""
    names: dict[str, int] = {}
    rows = sorted(([round(a - t0, 3), names.setdefault(group_of(requests[i]), len(names)), w, pt, c]
                   for (a, _, w, pt), (_, c, i) in zip(records, extra)), key=lambda r: r[0])
    last: dict[int, int] = {}
    seen: dict[int, set] = {}
    moves = 0
    for _, g, w, _, _ in rows:
        moves += g in last and last[g] != w
        last[g] = w
        seen.setdefault(g, set()).add(w)
    return rows, {"groups": len(seen), "on_several_workers": sum(len(v) > 1 for v in seen.values()),
                  "moves": moves}


def _quantile(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


PREDICTION_KEYS = ("predicted_exact", "predicted_exact_within_block", "predicted_mirror",
                   "predicted_mirror_within_block")


def predictions(pool) -> dict:
    """The router's predictions of cached tokens against the engines' reports, over the run (the
    policy is new each run, so its counters are the run's)."""
    total = dict.fromkeys(PREDICTION_KEYS, 0)
    for w in pool.stats()["workers"]:
        for k in PREDICTION_KEYS:
            total[k] += w.get(k) or 0
    for source in ("exact", "mirror"):
        n = total[f"predicted_{source}"]
        total[f"{source}_within_block_share"] = round(total[f"predicted_{source}_within_block"] / n, 3) if n else None
    return total


def engine_options(args) -> dict:
    opts: dict = {}
    if args.engine == "vllm":
        opts.update({"enable_prefix_caching": True, "load_format": args.load_format,
                     "max_model_len": args.max_model_len, "disable_log_stats": False})
        if args.kv_cache_memory_bytes:
            opts["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
        if args.gpu_memory_utilization:
            opts["gpu_memory_utilization"] = args.gpu_memory_utilization
    elif args.engine == "echo" and args.echo_delay_s:
        opts["delay_s"] = args.echo_delay_s
    for kv in args.engine_option:
        key, _, value = kv.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def bench_pool(args) -> dict:
    text = Text(args.model, args.engine)
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_LOG_STATS_INTERVAL", "1")   # the workers inherit it
    # cache_aware with events at the start: on vLLM that turns on the engines' KV events and the
    # pool's index, which every cache_aware:events=true run then uses (set_routing swaps only the policy).
    kwargs = {"engine": args.engine, "engine_options": engine_options(args), "routing": "cache_aware",
              "routing_options": {"events": True}}
    if args.model:
        kwargs["model"] = args.model
    if args.engine == "vllm":
        kwargs["gpus"] = [int(g) for g in args.gpus.split(",")]
    else:
        kwargs["num_workers"] = args.num_workers
    result: dict = {"config": {k: v for k, v in vars(args).items()}, "text": text.source,
                    "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                    "runs": [], "summary": {}}
    workloads = args.workloads.split(",")
    policies = args.policies.split(",")
    for p in policies:
        make_policy(p)                     # a typo fails here, before any engine starts
    t_start = time.perf_counter()
    with mpdp.Pool(**kwargs) as pool:
        result["pool_start_s"] = round(time.perf_counter() - t_start, 1)
        result["workers"] = [{k: w.get(k) for k in ("index", "gpus", "kv_cache_tokens", "max_model_len", "capacity")}
                             for w in pool.stats()["workers"]]
        paths = log_paths(pool)
        warm = random_prompts(text, random.Random(12345), 2 * args.threads, 64)
        run_once(pool, warm, args.threads, args.max_tokens, args.stream)   # compile paths, fill CUDA graphs
        run = 0
        for rnd in range(args.rounds):
            for w, workload in enumerate(workloads):
                order = policies[rnd % len(policies):] + policies[:rnd % len(policies)]
                # one draw per workload and round, the same for every policy (see fresh)
                base = build(workload, text, args.seed + 1 + rnd * len(workloads) + w, args.scale, args)
                for policy in order:
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        result["cut_by_budget"] = True
                        break
                    run += 1
                    requests = fresh(base, run)
                    set_routing(pool, policy)
                    offsets = log_sizes(paths)
                    row = run_once(pool, requests, args.threads, args.max_tokens, args.stream)
                    row["predictions"] = predictions(pool)
                    time.sleep(args.settle_s)      # let the engines log the run's last stats line
                    row.update({"round": rnd, "workload": workload, "policy": policy,
                                "engine_log": engine_log(paths, offsets)})
                    result["runs"].append(row)
                    print(f"round {rnd} {workload:7s} {policy:16s} {row['requests_per_s']:9.2f} req/s "
                          f"p90 {row['ttft_p90_s'] or row['latency_p90_s']} s cached {row['cached_share']} "
                          f"busy {[w['busy_s'] for w in row['workers'].values()]} "
                          f"hit% {[e['prefix_cache_hit_rate_last_pct'] for e in row['engine_log'].values()]} "
                          f"spread {row['spread']}", flush=True)
                    write(args.json, summarize(result))
    return summarize(result)


def _share(rows: list[dict], source: str) -> float | None:
    n = sum(x["predictions"][f"predicted_{source}"] for x in rows if x.get("predictions"))
    ok = sum(x["predictions"][f"predicted_{source}_within_block"] for x in rows if x.get("predictions"))
    return round(ok / n, 3) if n else None


def summarize(result: dict) -> dict:
    summary: dict = {}
    saw_stats = any(e["stats_lines"] for r in result["runs"] for e in r["engine_log"].values())
    for r in result["runs"]:
        summary.setdefault(r["workload"], {}).setdefault(r["policy"], []).append(r)
    table = {}
    for workload, by_policy in summary.items():
        base = by_policy.get("least_loaded")
        base_rps = statistics.fmean(x["requests_per_s"] for x in base) if base else None
        table[workload] = {}
        for policy, rows in by_policy.items():
            rps = statistics.fmean(x["requests_per_s"] for x in rows)
            busy = {}
            for x in rows:
                for w, d in x["workers"].items():
                    busy.setdefault(w, []).append(d["busy_s"] / x["seconds"] if x["seconds"] else 0)
            hits = {}
            for x in rows:
                for w, e in x["engine_log"].items():
                    if e["prefix_cache_hit_rate_last_pct"] is not None:
                        hits.setdefault(w, []).append(e["prefix_cache_hit_rate_last_pct"])
            def mean_of(field, rows=rows):
                vals = [x[field] for x in rows if x.get(field) is not None]
                return round(statistics.fmean(vals), 4) if vals else None

            table[workload][policy] = {
                "requests_per_s": round(rps, 2),
                "latency_p90_s": mean_of("latency_p90_s"), "ttft_p90_s": mean_of("ttft_p90_s"),
                "cached_share": mean_of("cached_share"),
                "predictions_within_block": {
                    s: _share(rows, s) for s in ("exact", "mirror") if _share(rows, s) is not None},
                "rounds": [x["requests_per_s"] for x in rows],
                "groups_on_several_workers": [x["spread"]["on_several_workers"] for x in rows if x.get("spread")],
                "group_moves": [x["spread"]["moves"] for x in rows if x.get("spread")],
                "ratio_to_least_loaded": round(rps / base_rps, 3) if base_rps else None,
                "busy_share_per_worker": {w: round(statistics.fmean(v), 3) for w, v in sorted(busy.items())},
                "vllm_prefix_cache_hit_rate_pct": {w: round(statistics.fmean(v), 1) for w, v in sorted(hits.items())}
                or None,
            }
    result["summary"] = table
    result["vllm_hit_rate_source"] = (
        "vLLM's own LoggingStatLogger lines in each worker's log (rolling over its recent requests)"
        if saw_stats else "not reachable: no vLLM stats lines in the worker logs (mpdp does not expose "
        "vLLM's counters; see the module docstring)")
    return result


# -- dispatcher-side cost ---------------------------------------------------------------------------
def micro(args) -> dict:
    """µs per choose + assigned (+ finished) on the dispatcher thread, per policy; route_key on the caller's."""
    text = Text(None, "echo")
    rng = random.Random(args.seed)
    n = args.micro_requests
    docs = [text.words(rng, 3000) for _ in range(64)]
    reqs = [EngineRequest(i, f"{docs[rng.randrange(64)]}\n\nQuestion: {text.words(rng, 12)}?", None, None,
                          {"max_tokens": 8}) for i in range(n)]
    out = {"prompt_tokens": 3000, "requests": n, "workers": 2, "machine": f"{os.cpu_count()}-core CPU",
           "python": platform.python_version(), "policies": {}}
    for name in POLICY_NAMES:
        best = None
        for _ in range(args.micro_repeats):
            policy = POLICIES[name]()
            t0 = time.perf_counter()
            keys = [policy.route_key(r) for r in reqs]
            key_us = (time.perf_counter() - t0) / n * 1e6
            tickets = [Ticket(i, estimate_cost(r), k) for i, (r, k) in enumerate(zip(reqs, keys))]
            workers = [WorkerLoad(i, capacity=10**6) for i in range(2)]
            for w in workers:
                policy.worker_added(w.index, {"kv_cache_tokens": 163_840})
            in_flight: deque[tuple[WorkerLoad, Ticket]] = deque()
            t0 = time.perf_counter()
            for t in tickets:               # the scheduler's bind and release, inlined, around the policy
                w = policy.choose(t, workers)
                w.in_flight[t.id] = t
                w.outstanding += t.cost
                policy.assigned(t, w.index)
                in_flight.append((w, t))
                if len(in_flight) > 128:    # 128 callers: the oldest comes back
                    w0, t0_ = in_flight.popleft()
                    del w0.in_flight[t0_.id]
                    w0.outstanding -= t0_.cost
                    policy.finished(t0_, w0.index)
            us = (time.perf_counter() - t0) / n * 1e6
            if best is None or us < best[0]:
                best = (us, key_us)
        out["policies"][name] = {"dispatcher_us_per_request": round(best[0], 2),
                                 "route_key_us_per_request": round(best[1], 2)}
    base = out["policies"]["least_loaded"]["dispatcher_us_per_request"]
    for name, row in out["policies"].items():
        row["ratio_to_least_loaded"] = round(row["dispatcher_us_per_request"] / base, 2)
    from bench.prefix_events import micro_events

    out["kv_events"] = micro_events(text, args.model, n, args.micro_repeats)
    for name, row in out["policies"].items():
        print(f"{name:16s} dispatcher {row['dispatcher_us_per_request']:7.2f} µs/request "
              f"({row['ratio_to_least_loaded']:.1f}x least_loaded), route_key {row['route_key_us_per_request']:7.2f} µs")
    return out


def write(path: str | None, result: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def add_workload_arguments(ap: argparse.ArgumentParser) -> None:
    """The callers and the workloads' sizes (``build`` reads them), shared with bench/prefix_sim.py."""
    ap.add_argument("--threads", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--random-tokens", type=int, default=1000)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--tenant-tokens", type=int, default=6000)
    ap.add_argument("--tenant-requests", type=int, default=480)
    ap.add_argument("--tenant-skew", type=float, default=0.6, help="tenant weights 1/rank^skew (0: uniform)")
    ap.add_argument("--conversations", type=int, default=128, help="chat: conversations (one caller each at a time)")
    ap.add_argument("--turns", type=int, default=6, help="chat: turns per conversation")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink document counts and lengths (smoke tests)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("echo", "hf", "vllm"), default="echo")
    ap.add_argument("--model", default=None, help="model folder (vllm, hf); tokenizer.json there calibrates prompts")
    ap.add_argument("--load-format", default="auto", help="vLLM load_format (dummy: random weights)")
    ap.add_argument("--gpus", default="0,0", help="GPU per worker (vllm): 0,0 is two workers sharing GPU 0")
    ap.add_argument("--num-workers", type=int, default=2, help="workers for CPU engines")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                    help="vLLM kv_cache_memory_bytes per worker (a fixed cache: two engines profiling one GPU at once get lopsided ones)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--echo-delay-s", type=float, default=0.0, help="echo engine: seconds each request is held")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES),
                    help="comma-separated; a policy's options after a colon, joined by +: prefix_affinity:slack=1000000000")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", action="store_true", help="stream each request and measure its TTFT")
    add_workload_arguments(ap)
    ap.add_argument("--settle-s", type=float, default=1.5, help="pause after each run (vLLM logs its stats each second)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting runs after this many seconds (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro", action="store_true", help="only the dispatcher-side routing cost, no pool")
    ap.add_argument("--micro-requests", type=int, default=5000)
    ap.add_argument("--micro-repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    result = micro(args) if args.micro else bench_pool(args)
    write(args.json, result)
    if not args.micro:
        for workload, by_policy in result["summary"].items():
            for policy, row in by_policy.items():
                print(f"{workload:7s} {policy:26s} {row['requests_per_s']:9.2f} req/s "
                      f"x{row['ratio_to_least_loaded']} p90 ttft {row['ttft_p90_s']} latency {row['latency_p90_s']} "
                      f"cached {row['cached_share']} predicted {row['predictions_within_block']} "
                      f"busy {row['busy_share_per_worker']} "
                      f"hit% {row['vllm_prefix_cache_hit_rate_pct']}")
        print(f"vLLM hit rates: {result['vllm_hit_rate_source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
