#!/usr/bin/env python3
"""DSPy ChainOfThought evaluation throughput: mpdp pool vs. k OpenAI-compatible vLLM servers.

    python -m bench.dspy_eval --variants mpdp1,mpdp4,server4 --threads 80,4096 --waves 2 --json out.json

Each thread count runs over max(--questions, --waves x threads) questions, so that a large thread
count still has a steady state and not only a ramp-up and a drain.

Variants: ``mpdp<k>`` (mpdp.dspy.LM on a k-GPU pool) and ``server<k>`` (k vLLM api_servers on
loopback, one per GPU, started by bench/vllm_servers.py; DSPy threads spread over them round
robin). The DSPy cache is off so every question reaches the engines. With dummy weights answers are
random (accuracy ~0) and DSPy's ChatAdapter would fall back to JSONAdapter (a second LM call, in
JSON mode) on every question: ``--adapter chat`` (the default) turns that fallback off so both
routes do the same work, one call a question; ``--adapter chat+json`` keeps DSPy's default. LM calls are counted and reported.
Self-check on CPU: ``--engine echo`` (mpdp "echo" engine, num_workers=k; server variants skipped).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import sys
import time
import warnings
from pathlib import Path

import dspy

import mpdp
import mpdp.dspy
from bench.gpu_util import GpuUtilization
from bench.vllm_servers import VllmServers

REFERENCE = ("seed's reference (different machine/model, context only): "
             "1 GPU 5.0 questions/min, 4 GPUs 16.7 questions/min, 3.34x")


# ─── Data and metric ─────────────────────────────────────────────────────────


def make_devset(n: int, seed: int = 0) -> list[dspy.Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(dspy.Example(question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question"))
    return out


def metric(example, pred, trace=None) -> bool:
    return str(getattr(pred, "answer", "")).strip() == example.answer


# ─── Round robin over k LMs (server<k>) ──────────────────────────────────────


class RoundRobinLM(dspy.BaseLM):
    """Each call goes to the next of k dspy.LM objects (itertools.count: thread-safe under the GIL)."""

    def __init__(self, lms: list[dspy.LM]):
        first = lms[0]
        super().__init__(model=first.model, model_type=first.model_type,
                         temperature=first.kwargs.get("temperature"),
                         max_tokens=first.kwargs.get("max_tokens", 1000), cache=False)
        self.kwargs = dict(first.kwargs)
        self.lms = lms
        self._next = itertools.count()

    def _pick(self) -> dspy.LM:
        return self.lms[next(self._next) % len(self.lms)]

    def __call__(self, *args, **kwargs):
        return self._pick()(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        return await self._pick().acall(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._pick().forward(*args, **kwargs)

    async def aforward(self, *args, **kwargs):
        return await self._pick().aforward(*args, **kwargs)


# ─── Running one variant ─────────────────────────────────────────────────────


def pool_counts(pool) -> dict[str, float]:
    workers = pool.stats()["workers"]
    return {"requests": float(sum(w["requests"] for w in workers)),
            "tokens": float(sum(w["tokens"] for w in workers))}


def make_adapter(name: str) -> dspy.Adapter:
    """``chat``: DSPy's ChatAdapter without its JSONAdapter fallback, one LM call a question.
    ``chat+json``: DSPy's default. Dummy weights never produce a parsable answer, so every question
    then makes a second call in JSON mode; mpdp honours that ``response_format`` with a grammar while
    ``dspy.LM("openai/<unknown model>")`` drops it (the model is not in litellm's registry), so the
    two routes do different work. ``chat`` makes them do the same."""
    if name == "chat":
        return dspy.ChatAdapter(use_json_adapter_fallback=False)
    if name == "chat+json":
        return dspy.ChatAdapter()
    raise SystemExit(f"unknown adapter {name!r} (chat or chat+json)")


def evaluate(lm, devset, threads: int, adapter: str) -> tuple[float, float, dict, float]:
    """Wall seconds, score, each GPU's kernel-busy share during the run ({} without GPUs), and the
    CPU this process spent (every thread: DSPy, the LM client, mpdp's dispatcher; not the engines,
    which are other processes) in cores: near 1.0 means the client held the GIL all the time."""
    program = dspy.ChainOfThought("question -> answer")
    evaluator = dspy.Evaluate(devset=devset, metric=metric, num_threads=threads, display_progress=False,
                              max_errors=len(devset) * 10 + 10, provide_traceback=False)
    with dspy.context(lm=lm, adapter=make_adapter(adapter)), GpuUtilization() as util:
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = evaluator(program)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    score = getattr(result, "score", result)
    return wall, float(score), util.summary(), cpu / wall


def questions_for(threads: int, args) -> int:
    return max(args.questions, args.waves * threads)


def measure(name: str, k: int, lm, counts, thread_list: list[int], args, setup_s: float,
            settle_s: float = 0.0) -> list[dict]:
    """One row per thread count; ``counts()`` reads the engines' request/token counters."""
    rows = []
    for threads in thread_list:
        devset = make_devset(questions_for(threads, args))
        before = counts()
        wall, score, busy, client_cores = evaluate(lm, devset, threads, args.adapter)
        time.sleep(settle_s)
        rows.append(row(name, k, threads, wall, score, counts(), before, setup_s, len(devset), busy,
                        client_cores))
    return rows


def run_variant(name: str, k: int, kind: str, thread_list: list[int], args, options) -> list[dict]:
    setup_t0 = time.perf_counter()
    if kind == "mpdp":
        if args.engine == "echo":
            pool = mpdp.Pool(model=args.model, engine="echo", num_workers=k)
        else:
            pool = mpdp.Pool(model=args.model, engine=args.engine, num_gpus=k, engine_options=options)
        try:
            lm = mpdp.dspy.LM(model=args.model, pool=pool, max_tokens=args.max_tokens,
                              temperature=0.6, cache=False)
            lm("Say hi.")                                   # warm: the pool answers before timing
            setup_s = time.perf_counter() - setup_t0
            rows = measure(name, k, lm, lambda: pool_counts(pool), thread_list, args, setup_s)
        finally:
            pool.close()
    else:
        servers = VllmServers(args.model, [str(i) for i in range(k)], options, Path(args.log_dir),
                              timeout=args.server_timeout)
        try:
            lms = [dspy.LM("openai/bench", api_base=f"http://127.0.0.1:{p}/v1", api_key="x",
                           max_tokens=args.max_tokens, temperature=0.6, cache=False) for p in servers.ports]
            for one in lms:
                one("Say hi.")                              # warm every server
            lm = RoundRobinLM(lms) if k > 1 else lms[0]
            setup_s = time.perf_counter() - setup_t0
            rows = measure(name, k, lm, servers.metrics, thread_list, args, setup_s,
                           settle_s=1.0)                    # let the servers' counters settle
        finally:
            servers.stop()
    return rows


def row(name, k, threads, wall, score, after, before, setup_s, n, busy, client_cores) -> dict:
    calls = after["requests"] - before["requests"]
    tokens = after["tokens"] - before["tokens"]
    return {"variant": name, "gpus": k, "threads": threads, "questions": n, "wall_s": wall,
            "questions_per_min": n / wall * 60, "lm_calls": int(calls), "output_tokens": int(tokens),
            "output_tokens_per_s": tokens / wall, "calls_per_question": calls / n,
            "score": score, "setup_s": setup_s, "gpu_busy": busy, "client_cpu_cores": client_cores}


# ─── Report ──────────────────────────────────────────────────────────────────


def busy_text(r: dict) -> str:
    """Median kernel-busy % of the GPUs the variant used (GPU 0..k-1), as "min-max"."""
    medians = [v["median"] for gpu, v in r.get("gpu_busy", {}).items() if int(gpu) < r["gpus"]]
    return f"{min(medians):.0f}-{max(medians):.0f}" if medians else "-"


def table(rows: list[dict]) -> str:
    def find(variant, threads):
        return next((r for r in rows if r["variant"] == variant and r["threads"] == threads), None)

    lines = ["| variant | GPUs | threads | questions | questions/min | wall s | LM calls | output tok/s | GPU busy % "
             "| client CPU cores | vs mpdp1 | vs server<k> |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find("mpdp1", r["threads"])
        server = find(f"server{r['gpus']}", r["threads"])
        vs1 = f"{r['questions_per_min'] / base['questions_per_min']:.2f}x" if base else "-"
        vss = f"{r['questions_per_min'] / server['questions_per_min']:.2f}x" if server else "-"
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['threads']} | {r['questions']} | {r['questions_per_min']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['lm_calls']} | {r['output_tokens_per_s']:.0f} | {busy_text(r)} | "
                     f"{r['client_cpu_cores']:.2f} | {vs1} | {vss} |")
    return "\n".join(lines)


def estimate_s(kind: str, k: int, thread_list: list[int], args, rows: list[dict]) -> float:
    """Rough: start-up plus each thread count's questions at the rate seen at that thread count
    (scaled by GPUs; else the best rate seen). Nothing measured yet: start-up only, so the first
    variant always runs."""
    startup = 5 if args.engine == "echo" else (90 if kind == "mpdp" else 150)
    total = startup
    for threads in thread_list:
        rates = [r["questions_per_min"] / r["gpus"] for r in rows if r["threads"] == threads]
        rates = rates or [r["questions_per_min"] / r["gpus"] for r in rows]
        if not rates:
            continue
        total += questions_for(threads, args) / (max(rates) * k) * 60
    return total


def write_json(args, rows: list[dict], skipped: list[str]) -> None:
    if not args.json:
        return
    shown = dict(vars(args), model=os.path.basename(os.path.normpath(args.model)), json=None, log_dir=None)
    with open(args.json, "w") as f:
        json.dump({"args": shown, "rows": rows, "skipped": skipped, "reference": REFERENCE}, f, indent=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(os.environ.get("MPDP_GPU_MODELS", "."), "qwen3-8b-shape"))
    p.add_argument("--questions", type=int, default=500)
    p.add_argument("--threads", default="80", help="one number or a comma list (each variant runs at each)")
    p.add_argument("--waves", type=int, default=0,
                   help="run at least waves x threads questions at each thread count")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--adapter", default="chat", help="chat (one call a question) or chat+json (DSPy's "
                   "default: a JSON-mode second call whenever parsing fails)")
    p.add_argument("--engine-options", default='{"load_format": "dummy"}', help="JSON")
    p.add_argument("--variants", default="mpdp1,mpdp4,server4")
    p.add_argument("--json", default=None)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--server-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", default="/tmp/dspy_eval_logs")
    p.add_argument("--engine", default="vllm", help=argparse.SUPPRESS)   # "echo": CPU self-check
    args = p.parse_args()

    # DSPy 3.4 warns when messages= reaches an LM from anything but an adapter: here, RoundRobinLM.
    warnings.filterwarnings("ignore", "Passing OpenAI-style", DeprecationWarning)
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    logging.getLogger("dspy").setLevel(logging.CRITICAL)   # one parse-failure log per question otherwise
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    thread_list = [int(t) for t in str(args.threads).split(",") if t.strip()]
    options = json.loads(args.engine_options)
    started = time.monotonic()
    rows: list[dict] = []
    skipped: list[str] = []

    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        kind = "mpdp" if name.startswith("mpdp") else "server" if name.startswith("server") else None
        if kind is None:
            raise SystemExit(f"unknown variant {name!r} (mpdp<k> or server<k>)")
        k = int(name[len(kind):] or 1)
        if kind == "server" and args.engine == "echo":
            skipped.append(f"{name} (echo engine: no servers)")
            print(f"skip {name}: echo engine", flush=True)
            continue
        if args.budget_s is not None:
            left = args.budget_s - (time.monotonic() - started)
            need = estimate_s(kind, k, thread_list, args, rows)
            if need > left:
                skipped.append(f"{name} (estimate {need:.0f} s > {left:.0f} s left)")
                print(f"skip {name}: estimate {need:.0f} s > {left:.0f} s left", flush=True)
                continue
        print(f"== {name}: {k} GPU(s), threads {thread_list}", flush=True)
        try:
            new = run_variant(name, k, kind, thread_list, args, options)
        except Exception as e:                       # one failed variant must not lose the others
            print(f"!! {name} failed: {type(e).__name__}: {e}", flush=True)
            skipped.append(f"{name} (failed: {type(e).__name__}: {e})")
            new = []
        for r in new:
            print(f"   threads {r['threads']}: {r['questions_per_min']:.1f} q/min, {r['wall_s']:.1f} s, "
                  f"{r['lm_calls']} LM calls ({r['calls_per_question']:.2f}/q), "
                  f"{r['output_tokens']} out tokens ({r['output_tokens_per_s']:.0f}/s), "
                  f"GPU busy {busy_text(r)} %, client CPU {r['client_cpu_cores']:.2f} cores, "
                  f"score {r['score']:.1f}, setup {r['setup_s']:.0f} s", flush=True)
        rows += new
        write_json(args, rows, skipped)

    print()
    print(table(rows))
    print()
    print(REFERENCE)
    if skipped:
        print("skipped: " + "; ".join(skipped))
    write_json(args, rows, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
