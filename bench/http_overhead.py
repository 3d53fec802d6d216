"""What HTTP costs: the echo engine (no model) through ``mpdp serve`` against the same pool called
directly (``pool.asubmit``), same machine, same run, same client concurrency.

For each concurrency (default 1 and 32) it sends short non-streamed chat requests, each client
task one at a time, and reports requests/s and p50/p99 latency; then the same through HTTP
(aiohttp, keep-alive connections, non-streamed and streamed: httpx's connection pool stalls
above a few concurrent requests on 2 cores and measured itself, not the server). The pool and
the server each have 2 echo workers; the direct pool is closed before the server starts.

    python -m bench.http_overhead --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import mpdp

MESSAGES = [{"role": "user", "content": "What is the capital of France? Please answer briefly."}]


def summary(latencies: list[float], elapsed: float) -> dict:
    qs = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(qs[49] * 1e3, 3), "p99_ms": round(qs[98] * 1e3, 3)}


async def load(call, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    todo = iter(range(total))

    async def lane():
        for _ in todo:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    for _ in range(min(50, total)):          # warm-up: connections, first-call costs
        await call()
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - started)


def direct(concurrencies, total) -> dict:
    out = {}
    with mpdp.Pool(engine="echo", num_workers=2) as pool:
        async def call():
            c = await pool.asubmit(messages=MESSAGES, max_tokens=64)
            assert c.text

        for c in concurrencies:
            out[c] = asyncio.run(load(call, c, total if c > 1 else total // 4))
    return out


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mpdp.cli", "serve", "--engine", "echo", "--num-workers", "2",
                             "--port", "0", "--served-model-name", "m"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE, text=True)
    url, ready = None, threading.Event()

    def read():
        nonlocal url
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
            if "workers ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or url is None:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, url


def over_http(concurrencies, total, url) -> dict:
    out = {}
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 64}
    for stream in (False, True):
        for c in concurrencies:
            async def run():
                connector = aiohttp.TCPConnector(limit=c)
                async with aiohttp.ClientSession(url, connector=connector) as client:
                    async def call():
                        payload = {**body, "stream": True} if stream else body
                        async with client.post("/v1/chat/completions", json=payload) as r:
                            assert r.status == 200
                            if stream:
                                async for _ in r.content:       # every SSE line
                                    pass
                            else:
                                await r.read()

                    return await load(call, c, total if c > 1 else total // 4)

            out[f"{'stream' if stream else 'plain'}-{c}"] = asyncio.run(run())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000, help="per concurrency level (a quarter at 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = {"machine": f"{os.cpu_count()}-core CPU, {platform.python_implementation()} {platform.python_version()}",
              "direct": direct(args.concurrency, args.requests)}
    proc, url = start_server()
    try:
        result["http"] = over_http(args.concurrency, args.requests, url)
    finally:
        proc.terminate()
        proc.wait(60)
    for c in args.concurrency:
        d, h = result["direct"][c], result["http"][f"plain-{c}"]
        result.setdefault("ratios", {})[c] = {"requests_per_s": round(h["requests_per_s"] / d["requests_per_s"], 3),
                                              "p50": round(h["p50_ms"] / d["p50_ms"], 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
