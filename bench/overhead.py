"""What the pool itself costs: the echo engine (no model), 2 workers.

Measures, side by side with CPython's ProcessPoolExecutor doing the same echo on 2 processes:
  - batch: requests/s through ``generate(list)`` of 100k short prompts (executor: ``map`` with chunks);
  - threads: requests/s and p50/p99 latency with 80 threads each submitting one request and
    waiting for it before the next (the ``dspy.Evaluate(num_threads=80)`` pattern);
  - light load: p50/p99 latency of one thread, one request at a time;
  - dispatcher CPU time per request (CPU clock of the dispatcher thread over the batch run).

    python -m bench.overhead --json bench/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import mpdp


def echo(prompt: str) -> str:          # the executor's "engine"
    return prompt[:64]


def thread_clock(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def percentiles(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=100)
    return qs[49] * 1e6, qs[98] * 1e6


def run_threads(submit_and_wait, n_threads: int, total: int) -> dict:
    per_thread = total // n_threads
    lat: list[list[float]] = [[] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads + 1)

    def client(t):
        mine = lat[t]
        barrier.wait()
        for i in range(per_thread):
            t0 = time.perf_counter()
            submit_and_wait(f"t{t}-{i}")
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    flat = [x for xs in lat for x in xs]
    p50, p99 = percentiles(flat)
    return {"requests_per_s": len(flat) / elapsed, "p50_us": p50, "p99_us": p99, "requests": len(flat)}


def run_light(pool, n: int) -> dict:
    """One thread, one request at a time: the latency of the pool alone."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        pool.submit(f"light {i}").result()
        lat.append(time.perf_counter() - t0)
    p50, p99 = percentiles(lat)
    return {"p50_us": p50, "p99_us": p99, "requests": n}


def bench_pool(n_batch: int, n_threaded: int, n_light: int) -> dict:
    out = {}
    with mpdp.Pool(engine="echo", num_workers=2, max_tokens=64) as pool:
        prompts = [f"prompt number {i}" for i in range(n_batch)]
        pool.generate(prompts[:5000])                         # warm up
        dispatcher = pool._dispatcher._thread
        cpu0, t0 = thread_clock(dispatcher), time.perf_counter()
        results = pool.generate(prompts)
        elapsed, cpu = time.perf_counter() - t0, thread_clock(dispatcher) - cpu0
        assert [r.text for r in results] == [p[:64] for p in prompts]
        out["batch"] = {"requests_per_s": n_batch / elapsed, "seconds": elapsed,
                        "dispatcher_cpu_us_per_request": cpu / n_batch * 1e6}
        cpu0 = thread_clock(dispatcher)
        out["threads80"] = run_threads(lambda p: pool.submit(p).result(), 80, n_threaded)
        out["threads80"]["dispatcher_cpu_us_per_request"] = (thread_clock(dispatcher) - cpu0) / n_threaded * 1e6
        out["light"] = run_light(pool, n_light)
    return out


def bench_executor(n_batch: int, n_threaded: int, n_light: int) -> dict:
    out = {}
    with ProcessPoolExecutor(2) as ex:
        prompts = [f"prompt number {i}" for i in range(n_batch)]
        list(ex.map(echo, prompts[:5000], chunksize=256))
        t0 = time.perf_counter()
        results = list(ex.map(echo, prompts, chunksize=256))
        elapsed = time.perf_counter() - t0
        assert results == [p[:64] for p in prompts]
        out["batch"] = {"requests_per_s": n_batch / elapsed, "seconds": elapsed}
        out["threads80"] = run_threads(lambda p: ex.submit(echo, p).result(), 80, n_threaded)
        lat = []
        for i in range(n_light):
            t0 = time.perf_counter()
            ex.submit(echo, f"light {i}").result()
            lat.append(time.perf_counter() - t0)
        p50, p99 = percentiles(lat)
        out["light"] = {"p50_us": p50, "p99_us": p99, "requests": n_light}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--threaded", type=int, default=40_000)
    ap.add_argument("--light", type=int, default=2_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "command": " ".join(["python -m bench.overhead"] + sys.argv[1:]),
        "mpdp": bench_pool(args.batch, args.threaded, args.light),
        "process_pool_executor": bench_executor(args.batch, args.threaded, args.light),
    }
    m, e = result["mpdp"], result["process_pool_executor"]
    rows = [
        ("batch generate(list), req/s", m["batch"]["requests_per_s"], e["batch"]["requests_per_s"], ">= 50,000"),
        ("80 threads, req/s", m["threads80"]["requests_per_s"], e["threads80"]["requests_per_s"], ">= 10,000"),
        ("80 threads, p50 latency µs", m["threads80"]["p50_us"], e["threads80"]["p50_us"], ""),
        ("80 threads, p99 latency µs", m["threads80"]["p99_us"], e["threads80"]["p99_us"], ""),
        ("light load, p50 latency µs", m["light"]["p50_us"], e["light"]["p50_us"], "<= 1,000"),
        ("light load, p99 latency µs", m["light"]["p99_us"], e["light"]["p99_us"], ""),
        ("dispatcher CPU µs/request (batch)", m["batch"]["dispatcher_cpu_us_per_request"], None, "<= 50"),
        ("dispatcher CPU µs/request (80 threads)", m["threads80"]["dispatcher_cpu_us_per_request"], None, "<= 50"),
    ]
    print("| metric | mpdp | ProcessPoolExecutor(2) | ratio | target |\n|---|---|---|---|---|")
    for name, a, b, target in rows:
        ratio = f"{a / b:.2f}" if b else "—"
        print(f"| {name} | {a:,.0f} | {'—' if b is None else f'{b:,.0f}'} | {ratio} | {target} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
