"""The batch limit where it must not cost: light, DSPy-shaped, prefill-heavy, mixed and served loads.

    python -m bench.batch_loads --json out/batch_loads.json

Issue 26 asks that the adaptive limit (the default) be no slower than the old fixed credit
("today": ``batch_limit="off"``) where the controller has nothing to win. One pool of one vLLM worker
(the Qwen3-8B-shaped model, dummy weights, CUDA graphs) is started once; each load then runs under
both settings, switched with ``Pool.set_batch_limit`` on the same engine, the order swapped from one
load to the next (so neither setting always runs on a warmer engine):

  light     one caller, one request at a time (--light-requests x --light-tokens)
  dspy80    80 threads, each one ``mpdp.dspy.LM`` call at a time (DSPy's LM path, no adapter)
  prefill   long prompts, short answers, all at once (--prefill-requests x --prefill-len, 16 tokens)
  mixed     prompt and output lengths spread log-uniformly (32-2,048 and 16-1,024), all at once
  serve512  the pool behind the OpenAI server (``create_app``, as ``mpdp serve`` runs it) and 512
            streaming clients in --procs processes (bench.serve_vs_vllm): output tokens/s, TTFT

Each row: output tokens/s, requests/s, latency (and TTFT) quantiles, the limit at the end and why.
The JSON is rewritten after every measurement; a time budget (--budget-s) skips what would not fit.
On CPU, ``--engine hf --model smollm2-135m-instruct --scale 0.02`` runs the same code in a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOADS = ("light", "dspy80", "prefill", "mixed", "serve512")


def _q(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loads:
    def __init__(self, pool, args):
        self.pool, self.args = pool, args
        self.extra = {"ignore_eos": True} if pool.engine == "vllm" else {}

    def _n(self, x: int, low: int = 1) -> int:
        return max(low, round(x * self.args.scale))

    def _batch(self, items: list[dict]) -> dict:
        """All at once through ``generate``; per-request latency from each future's own end."""
        t0 = time.perf_counter()
        done_at: list[float] = []
        futs = [self.pool.submit(**it, temperature=0.0, **self.extra) for it in items]
        for f in futs:
            f.add_done_callback(lambda _f: done_at.append(time.perf_counter()))
        comps = [f.result() for f in futs]
        return self._row(time.perf_counter() - t0, comps, [t - t0 for t in done_at])

    @staticmethod
    def _row(elapsed: float, comps: list, latencies: list[float], ttfts: list[float] | None = None) -> dict:
        out = sum(c.completion_tokens for c in comps)
        row = {"seconds": round(elapsed, 3), "requests": len(comps), "output_tokens": out,
               "output_tok_s": round(out / elapsed, 1), "requests_per_s": round(len(comps) / elapsed, 2),
               "latency_p50_s": _q(latencies, 0.5), "latency_p90_s": _q(latencies, 0.9)}
        if ttfts is not None:
            row |= {"ttft_p50_s": _q(ttfts, 0.5), "ttft_p90_s": _q(ttfts, 0.9)}
        return row

    def light(self, rng) -> dict:
        comps, lat, ttfts = [], [], []
        t0 = time.perf_counter()
        for _ in range(self._n(self.args.light_requests, 2)):
            a = time.perf_counter()
            s = self.pool.stream(prompt_token_ids=_ids(rng, 256, self.args.vocab), max_tokens=self.args.light_tokens,
                                 temperature=0.0, **self.extra)
            first = None
            for _ in s:
                first = first or time.perf_counter() - a
            comps.append(s.result())
            lat.append(time.perf_counter() - a)
            ttfts.append(first)
        return self._row(time.perf_counter() - t0, comps, lat, [t for t in ttfts if t is not None])

    def dspy80(self, rng) -> dict:
        import dspy

        import mpdp

        lm = mpdp.dspy.LM(pool=self.pool, cache=False, temperature=0.0, max_tokens=self.args.dspy_tokens)
        questions = [f"Question {i}: " + " ".join(rng.choice(("why", "how", "what", "river", "city", "model"))
                                                   for _ in range(40)) for i in range(self._n(self.args.dspy_questions, 4))]
        it, lock = iter(questions), threading.Lock()
        lat: list[float] = []
        errors: list[str] = []

        def caller():
            while True:
                with lock:
                    q = next(it, None)
                if q is None:
                    return
                a = time.perf_counter()
                try:
                    out = lm(q)                  # one user message, as a DSPy module sends
                except Exception as exc:  # noqa: BLE001  (counted, the run goes on)
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                with lock:
                    lat.append(time.perf_counter() - a)
                del out

        with dspy.context(lm=lm):
            threads = [threading.Thread(target=caller) for _ in range(self.args.dspy_threads)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
        lm.history.clear()
        return {"seconds": round(elapsed, 3), "requests": len(lat), "errors": len(errors), "error_sample": errors[:3],
                "requests_per_s": round(len(lat) / elapsed, 2), "latency_p50_s": _q(lat, 0.5),
                "latency_p90_s": _q(lat, 0.9), "threads": self.args.dspy_threads}

    def prefill(self, rng) -> dict:
        n, plen = self._n(self.args.prefill_requests, 4), self._n(self.args.prefill_len, 32)
        return self._batch([{"prompt_token_ids": _ids(rng, plen, self.args.vocab), "max_tokens": 16}
                            for _ in range(n)])

    def mixed(self, rng) -> dict:
        def loguni(lo, hi):
            return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

        items = [{"prompt_token_ids": _ids(rng, self._n(loguni(32, 2048), 8), self.args.vocab),
                  "max_tokens": self._n(loguni(16, 1024), 4)} for _ in range(self._n(self.args.mixed_requests, 4))]
        return self._batch(items)

    def serve512(self, rng) -> dict:
        import uvicorn

        from mpdp.server.app import create_app

        port = _free_port()
        app = create_app(self.pool, ["bench"])
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="off", loop="auto", http="auto"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        try:
            while not server.started:
                if not th.is_alive():
                    raise RuntimeError("the server thread ended before it started")
                time.sleep(0.05)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "serve.json"
                cmd = [sys.executable, "-m", "bench.serve_vs_vllm", "--base-url", f"http://127.0.0.1:{port}/v1",
                       "--model", "bench", "--concurrency", str(self._n(512, 2)),
                       "--requests", str(self._n(self.args.serve_requests, 4)),
                       "--max-tokens", str(self._n(self.args.serve_tokens, 4)), "--procs", str(self.args.procs),
                       "--json", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, self.args.budget_s))
                if not out.exists():
                    raise RuntimeError(f"the client wrote nothing (exit {proc.returncode}): {proc.stderr[-800:]}")
                r = json.loads(out.read_text())
        finally:
            server.should_exit = True
            th.join(30)
        return {"seconds": r["elapsed_s"], "requests": r["requests"] - r["failures"], "errors": r["failures"],
                "output_tokens": r["output_tokens"], "output_tok_s": r["output_tokens_per_s"],
                "requests_per_s": r["requests_per_s"], "ttft_p50_s": r["ttft_p50_ms"] / 1e3,
                "ttft_p99_s": r["ttft_p99_ms"] / 1e3, "latency_p50_s": r["e2e_p50_ms"] / 1e3,
                "latency_p99_s": r["e2e_p99_ms"] / 1e3, "concurrency": r["concurrency"]}


def set_mode(pool, mode: str, timeout: float = 30.0) -> None:
    """Switch and wait until the dispatcher shows it (a post is applied in its next round)."""
    pool.set_batch_limit(mode)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reason = pool.stats()["workers"][0].get("batch_limit_reason")
        if (reason == "off") == (mode == "off"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the pool did not switch to batch_limit={mode!r}")


def main(argv=None) -> int:
    models = os.environ.get("MPDP_GPU_MODELS", ".")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="vllm")
    p.add_argument("--model", default=f"{models}/qwen3-8b-shape")
    p.add_argument("--engine-options", default='{"load_format": "dummy"}', help="JSON")
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument("--modes", default="auto,off", help="the settings compared (the first is the default)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every count and length (CPU checks)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--light-requests", type=int, default=12)
    p.add_argument("--light-tokens", type=int, default=128)
    p.add_argument("--dspy-threads", type=int, default=80)
    p.add_argument("--dspy-questions", type=int, default=480)
    p.add_argument("--dspy-tokens", type=int, default=256)
    p.add_argument("--prefill-requests", type=int, default=512)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--mixed-requests", type=int, default=1024)
    p.add_argument("--serve-requests", type=int, default=2048)
    p.add_argument("--serve-tokens", type=int, default=256)
    p.add_argument("--procs", type=int, default=8, help="client processes for serve512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--json", default="batch_loads.json")
    args = p.parse_args(argv)

    import mpdp

    t0 = time.monotonic()
    modes = args.modes.split(",")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = {"num_gpus": 1} if args.engine == "vllm" else {"num_workers": 1}
    data = {"meta": {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
                     "modes": modes}, "results": [], "skipped": [], "failures": []}
    pool = mpdp.Pool(model=args.model, engine=args.engine, engine_options=json.loads(args.engine_options),
                     batch_limit=modes[0], **where)
    try:
        pool.submit(prompt_token_ids=[101, 102, 103], max_tokens=2).result()       # wait for the engine
        data["meta"]["start_s"] = round(time.monotonic() - t0, 1)
        data["meta"]["worker"] = {k: v for k, v in pool.stats()["workers"][0].items()
                                  if k in ("capacity", "batch_limit", "batch_limit_ceiling", "kv_cache_tokens")}
        loads = Loads(pool, args)
        longest = 0.0
        for i, name in enumerate(args.loads.split(",")):
            order = modes if i % 2 == 0 else modes[::-1]
            for mode in order:
                left = args.budget_s - (time.monotonic() - t0)
                if left < 1.2 * longest + 5:
                    data["skipped"].append({"load": name, "mode": mode, "reason": f"time budget: {left:.0f}s left"})
                    print(f"skip {name}/{mode}: {left:.0f}s left", flush=True)
                    continue
                set_mode(pool, mode)
                rng = random.Random(args.seed * 1000 + i)     # the same requests under each setting
                try:
                    row = getattr(loads, name)(rng)
                except Exception as exc:  # noqa: BLE001  (kept in the JSON, the next load runs)
                    data["failures"].append({"load": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    print(f"{name}/{mode} failed: {exc}", flush=True)
                    continue
                w = pool.stats()["workers"][0]
                row |= {"load": name, "mode": mode, "final_limit": w.get("batch_limit"),
                        "final_reason": w.get("batch_limit_reason")}
                longest = max(longest, row["seconds"])
                data["results"].append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(data, indent=1))
    finally:
        data["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
        out.write_text(json.dumps(data, indent=1))
        pool.close()
    print(report(data))
    return 1 if data["failures"] else 0


def report(data: dict) -> str:
    rows = data["results"]
    modes = data["meta"]["modes"]
    lines = [f"| load | metric | {' | '.join(modes)} | {modes[0]} / {modes[-1]} |",
             "|---|---|" + "---:|" * (len(modes) + 1)]
    for load in dict.fromkeys(r["load"] for r in rows):
        by = {r["mode"]: r for r in rows if r["load"] == load}
        for metric in ("output_tok_s", "requests_per_s", "ttft_p50_s", "latency_p50_s"):
            vals = [by.get(m, {}).get(metric) for m in modes]
            if all(v is None for v in vals):
                continue
            ratio = f"{vals[0] / vals[-1]:.3f}x" if vals[0] and vals[-1] else "-"
            lines.append(f"| {load} | {metric} | {' | '.join('-' if v is None else str(v) for v in vals)} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
