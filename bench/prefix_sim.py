"""Routing policies on a simulated pool: the real policies and scheduler, modelled vLLM engines.

A deterministic discrete-event simulation (no processes, no clocks) of bench/prefix.py's runs, for
tuning routing on a CPU. The pool side is mpdp's own code: the workloads come from
``bench.prefix.build``, each request gets its ticket from ``estimate_cost`` and the policy's
``route_key``, and ``mpdp.routing.Scheduler`` with the policy (``POLICIES``) binds it, so
``outstanding`` and ``ticket.cost`` move exactly as in the pool. Only the engines are modelled
(``bench/prefix_sim_engine.py``): a vLLM-like block prefix cache and continuous batching, on one
GPU that the engines share, calibrated against the measured 8B-shaped runs on one H200.

    python -m bench.prefix_sim                                  # every workload and policy
    python -m bench.prefix_sim --workloads docqa --policies least_loaded,cache_aware
    python -m bench.prefix_sim --set band=1.0 --set worth=8     # CacheAware settings to try
    python -m bench.prefix_sim --workloads tenants,docqa --model-set cache_tokens=116496 \
        --policies least_loaded,cache_aware,cache_aware:events=true+pending=false,cache_aware:events=true

A policy takes options as in bench/prefix.py (``name:key=value+...``). ``cache_aware`` routes by its
mirror; ``cache_aware:events=true`` by the modelled engines' KV events (``prefix_sim_engine.py``
publishes them as vLLM does: a block once the step that computes it is over, an eviction in the
engine's LRU order; a batch per step, a hop later) into mpdp's own ``KVIndex``, with the pending
layer; ``+pending=false`` without it (the first version, measured on one H100). The policy
tokenizes prompts one word a token, as the engines do.

Words are tokens: prompts are built with one word a token (the calibrated text of the GPU runs), so
mpdp's 4-characters-a-token estimate is off here as it is there. ``pure_affinity`` is a reference,
not a policy of mpdp: ``prefix_affinity`` with no load slack (a prefix stays where it went first),
the "2.5x" of issue 16.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import statistics
import sys
from collections import deque

from bench.prefix import WORKLOADS, Text, add_workload_arguments, build, parse_settings, sessions, write
from bench.prefix_sim_engine import Engine, EngineModel, prompt_tokens, token_ids
from mpdp.engines.base import EngineRequest
from mpdp.requests import estimate_cost
from mpdp.routing import POLICIES, CacheAware, PrefixAffinity, Scheduler, Ticket
from mpdp.routing.kv_index import KVIndex

SIM_POLICIES = ("least_loaded", "prefix_affinity", "cache_aware", "pure_affinity",
                "cache_aware:events=true+pending=false", "cache_aware:events=true")


def make_policy(spec: str, settings: dict | None = None):
    """A policy from ``name`` or ``name:key=value+...``; ``settings`` (``--set``) go to cache_aware
    under the spec's own options."""
    name, _, opts = spec.partition(":")
    kwargs = parse_settings(filter(None, opts.split("+")))
    if name == "pure_affinity":
        return PrefixAffinity(slack=10**18)
    if name == "cache_aware":
        return CacheAware(**{**(settings or {}), **kwargs})
    return POLICIES[name](**kwargs)


def _tokenize(request) -> list[int]:
    return token_ids(request.prompt, request.messages)


class WordText(Text):
    """bench.prefix's text at one word a token, as its calibration measured on the GPU model."""

    def __init__(self):
        self.words_per_token, self.source = 1.0, "one word a token (simulation)"


class Sim:
    """One run: ``threads`` callers in a closed loop over ``requests`` through one policy."""

    def __init__(self, policy, requests: list[dict], model: EngineModel, workers: int = 2,
                 threads: int = 128, max_tokens: int = 8, capacity: int = 1152):
        self.now = 0.0
        self.model = model
        self._events: list = []
        self._seq = itertools.count()
        self.scheduler = Scheduler(policy=policy)
        self.engines = [Engine(i, model, self) for i in range(workers)]
        # The engines' KV events, where the policy wants them: the pool's index, fed as the
        # listener thread would (each batch applied a hop after its step, in order).
        self.kv = KVIndex() if getattr(policy, "wants_kv_events", False) else None
        if self.kv is not None:
            policy.use_kv_events(self.kv, _tokenize, model.block)
        self._batch_seq = [0] * workers            # each engine's next event batch
        for e in self.engines:
            info = {"kv_cache_tokens": model.cache_tokens}
            if self.kv is not None:
                info["extra"] = {"kv_events": {"topic": f"sim/{e.index}", "endpoint": "inproc://sim",
                                               "block_size": model.block}}
                e.publish = True
            self.scheduler.add_worker(e.index, capacity, info)
            if self.kv is not None:
                self.kv.start(e.index, self.kv.wanted[e.index])
        self.requests = requests
        self.max_tokens = max_tokens
        self.threads = threads
        self._next = iter(sessions(requests))        # a chat's turns go to one caller, in order
        self._rest: dict[int, deque] = {}           # request -> what its caller sends after it
        self._gpu: dict[int, float] = {}            # engine index -> GPU work left in its step
        self.done = self.submitted = 0
        self.held = [0] * workers                   # requests each worker holds (dispatcher's view)
        self._since = [0.0] * workers
        self.busy = [0.0] * workers
        self.starved = 0.0                          # seconds a worker held nothing while another queued
        self._mark = 0.0
        self._sent: dict[int, float] = {}           # request -> when its caller submitted it
        self.ttft: list[float] = []
        self.latency: list[float] = []

    # -- events ----------------------------------------------------------------------------------
    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def gpu(self, engine: Engine, work: float) -> None:
        self._gpu[engine.index] = work

    def run(self) -> dict:
        for _ in range(self.threads):
            self.submit()
        events, gpu, shared = self._events, self._gpu, self.model.shared_gpu
        while events or gpu:
            # Engines sharing the GPU share it evenly (time slicing): each step runs at 1/n speed.
            n = len(gpu) if shared else 1
            t_gpu = self.now + min(gpu.values()) * n if gpu else float("inf")
            t_ev = events[0][0] if events else float("inf")
            t = min(t_gpu, t_ev)
            if gpu:
                step = (t - self.now) / n
                for i in gpu:
                    gpu[i] -= step
            self.now = t
            if t_gpu <= t_ev:
                for i in [i for i, left in gpu.items() if left <= 1e-12]:
                    del gpu[i]
                    self.engines[i].step_done()
            else:
                _, _, fn, args = heapq.heappop(events)
                fn(*args)
        return self.report()

    # -- the pool side: mpdp's scheduler and policy ----------------------------------------------
    def submit(self, rest: deque | None = None) -> None:
        """A caller sends its next request: the rest of its conversation, else a new session."""
        if not rest:
            job = next(self._next, None)
            if job is None:
                return
            rest = deque(job)
        i = rest.popleft()
        self._rest[i] = rest
        self.submitted += 1
        self._sent[i] = self.now
        body = self.requests[i]
        req = EngineRequest(i, body.get("prompt"), body.get("messages"), None, {"max_tokens": self.max_tokens})
        policy = self.scheduler.policy
        self.scheduler.enqueue(Ticket(i, estimate_cost(req), policy.route_key(req)))
        for index, tickets in self.scheduler.schedule().items():
            for t in tickets:
                self._hold(index, +1)
                self.at(self.now + self.model.hop_s, self.engines[index].arrive, t.id, self.tokens[t.id])

    def finished(self, engine: Engine, r) -> None:
        """The engine returned a request: the dispatcher hears it a hop later, the caller submits again."""
        def back():
            ticket = self.scheduler.finished(engine.index, r.id)
            if ticket is not None:
                self.scheduler.policy.reported(ticket, engine.index, r.prompt, r.cached)
            self._hold(engine.index, -1)
            self.done += 1
            self.latency.append(self.now - self._sent[r.id])
            self.submit(self._rest.pop(r.id))
        self.at(self.now + self.model.hop_s, back)

    def first_token(self, rid: int) -> None:
        self.ttft.append(self.now + self.model.hop_s - self._sent[rid])

    def published(self, engine: Engine, events: list[tuple]) -> None:
        """A step's KV events: the index applies them a hop later (``apply`` wants them in order)."""
        if self.kv is None:
            return
        seq = self._batch_seq[engine.index]
        self._batch_seq[engine.index] = seq + 1
        self.at(self.now + self.model.hop_s, self.kv.apply, engine.index, seq, events)

    def _hold(self, index: int, d: int) -> None:
        # Starved: a worker holds nothing while another holds two or more and callers still have
        # requests to send (the run's tail, when nothing is left to route, does not count).
        if min(self.held) == 0 and max(self.held) >= 2 and self.submitted < len(self.requests):
            self.starved += self.now - self._mark
        self._mark = self.now
        if self.held[index] == 0 and d > 0:
            self._since[index] = self.now
        self.held[index] += d
        if self.held[index] == 0:
            self.busy[index] += self.now - self._since[index]

    def report(self) -> dict:
        seconds = self.now
        prompt = sum(e.prompt_total for e in self.engines)
        policy = self.scheduler.policy
        stats = [policy.worker_stats(e.index) for e in self.engines] if hasattr(policy, "worker_stats") else []
        predicted = {}
        for source in ("exact", "mirror"):
            n = sum(s[f"predicted_{source}"] for s in stats)
            if n:
                predicted[source] = round(sum(s[f"predicted_{source}_within_block"] for s in stats) / n, 3)
        return {"requests": self.done, "seconds": round(seconds, 4), "starved_s": round(self.starved, 4),
                "requests_per_s": round(self.done / seconds, 2) if seconds else 0.0,
                "ttft_p90_s": _quantile(self.ttft, 0.9), "latency_p90_s": _quantile(self.latency, 0.9),
                "cached_share": round(sum(e.hit_total for e in self.engines) / prompt, 4) if prompt else None,
                "predicted_within_block": predicted,
                "workers": {str(e.index): {"requests": e.requests, "prompt_tokens": e.prompt_total,
                                           "computed_prompt_tokens": e.computed_total,
                                           "hit_rate_pct": round(100 * e.hit_total / max(1, e.prompt_total), 1),
                                           "busy_share": round(self.busy[e.index] / seconds, 3) if seconds else 0.0}
                            for e in self.engines}}


def _quantile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def run_one(workload: str, policy: str, args, model: EngineModel, settings: dict | None = None, seed: int = 1) -> dict:
    requests = build(workload, WordText(), seed, args.scale, args)
    sim = Sim(make_policy(policy, settings), requests, model, workers=args.workers, threads=args.threads,
              max_tokens=args.max_tokens)
    sim.tokens = [prompt_tokens(r, model.block) for r in requests]
    return sim.run()


def table(args, model: EngineModel, settings: dict | None = None) -> dict:
    """Every workload x policy, ``rounds`` seeds each; mean req/s and the ratio to least_loaded."""
    out: dict = {}
    for workload in args.workloads.split(","):
        rows = {}
        for policy in args.policies.split(","):
            runs = [run_one(workload, policy, args, model, settings, seed=args.seed + r) for r in range(args.rounds)]
            rows[policy] = {"requests_per_s": round(statistics.fmean(r["requests_per_s"] for r in runs), 2),
                            "runs": runs}
        base = rows.get("least_loaded", {}).get("requests_per_s")
        for policy, row in rows.items():
            row["ratio_to_least_loaded"] = round(row["requests_per_s"] / base, 3) if base else None
            last_run = row["runs"][-1]
            last = last_run["workers"]
            print(f"{workload:7s} {policy:38s} {row['requests_per_s']:8.2f} req/s  x{row['ratio_to_least_loaded']}"
                  f"  p90 ttft {last_run['ttft_p90_s']}  cached {last_run['cached_share']}"
                  f"  predicted {last_run['predicted_within_block']}"
                  f"  busy {[w['busy_share'] for w in last.values()]}"
                  f"  hit% {[w['hit_rate_pct'] for w in last.values()]}"
                  f"  computed {[w['computed_prompt_tokens'] for w in last.values()]}"
                  f"  starved {last_run['starved_s']}s", flush=True)
        out[workload] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default=",".join(SIM_POLICIES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a CacheAware setting (JSON value), e.g. band=1.0")
    ap.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine-model setting (JSON value), e.g. cache_tokens=200000")
    ap.add_argument("--rounds", type=int, default=2, help="seeds per workload x policy")
    ap.add_argument("--workers", type=int, default=2)
    add_workload_arguments(ap)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model = EngineModel(**parse_settings(args.model_set))
    settings = parse_settings(args.set)
    result = {"model": vars(model), "cache_aware_settings": settings, "table": table(args, model, settings)}
    write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
