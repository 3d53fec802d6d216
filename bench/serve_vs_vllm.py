"""A streaming client load against any OpenAI-compatible base URL: output tokens/s and TTFT.

Run the same load against ``mpdp serve --engine vllm`` and ``vllm serve`` (same GPU, same
model) to compare them: N concurrent streaming chat requests, each a fixed output length
(``ignore_eos``, which both servers accept), until ``--requests`` are done.

    python -m bench.serve_vs_vllm --base-url http://127.0.0.1:8000/v1 --model M \\
        --concurrency 256 --requests 2048 --max-tokens 256 --json out.json

Output tokens are counted from each stream's usage chunk (``stream_options.include_usage``);
TTFT is the time from sending a request to its first non-empty content delta. Chunks are the
events with content: a server that joins the deltas waiting for a slow client sends fewer. The streams are
spread over ``--procs`` client processes that start together after their warm-up, so the client
is not what limits the figure; failures are counted and a sample of their messages kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time

import httpx


def percentile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100)[q - 1]


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float | None, float, int, int]:
    """(TTFT, end-to-end seconds, output tokens, chunks with content) of one streamed request."""
    sent = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - sent, tokens, chunks


# A chunk's content, and an empty one (the role chunk, a final chunk with no text); quotes inside
# a text are escaped, so neither pattern can come from the text itself.
_CONTENT, _EMPTY = b'"content":"', b'"content":""'


async def one_light(client: tuple, body: dict) -> tuple[float | None, float, int, int]:
    """``one`` for a client that must cost less than the server it loads (``--client light``, for
    a CPU run where both share a few cores): aiohttp, and events counted in the bytes as they
    come, not parsed; only the usage event is decoded."""
    sent = time.perf_counter()
    first, chunks, rest, usage = None, 0, b"", None
    session, url = client
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        async for data in r.content.iter_any():
            rest += data
            cut = rest.rfind(b"\n\n") + 2
            done, rest = rest[:cut], rest[cut:]
            chunks += done.count(_CONTENT) - done.count(_EMPTY)
            if first is None and chunks:
                first = time.perf_counter() - sent
            if b'"error":' in done:
                raise RuntimeError(f"stream error: {done[:300]!r}")
            if b'"usage":{' in done:
                usage = next(e for e in done.split(b"\n\n") if b'"usage":{' in e)
    tokens = json.loads(usage[6:])["usage"]["completion_tokens"] if usage else 0
    return first, time.perf_counter() - sent, tokens, chunks


class _WithURL:
    """An aiohttp session and the URL it posts to (a base URL with a path needs aiohttp >= 3.10)."""

    def __init__(self, session, url: str):
        self.session, self.url = session, url

    async def __aenter__(self) -> tuple:
        return await self.session.__aenter__(), self.url

    async def __aexit__(self, *exc) -> None:
        await self.session.__aexit__(*exc)


def _client(args, headers: dict, concurrency: int):
    """(an async context of a connection pool, its one-request function, the errors it raises)."""
    if args.client == "light":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        session = aiohttp.ClientSession(connector=connector, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=args.timeout))
        return _WithURL(session, args.base_url.rstrip("/") + "/chat/completions"), one_light, aiohttp.ClientError
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=args.timeout, headers=headers), one, \
        httpx.HTTPError


def request_body(args) -> dict:
    prompt = ("Write a long story about a lighthouse keeper. " * max(1, args.prompt_words // 8)).strip()
    return {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}


async def lanes(args, requests: int, concurrency: int, ready=None) -> dict:
    """``concurrency`` streams in this process until ``requests`` are done. ``ready``: a barrier
    every client process meets after its warm-up, so they all start together."""
    body = request_body(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ttfts, e2es, tokens, chunks, errors = [], [], 0, 0, []
    todo = iter(range(requests))
    pool, one_request, http_error = _client(args, headers, concurrency)
    async with pool as c:
        await one_request(c, dict(body, max_tokens=4))   # warm-up (connections, compiled graphs)
        if ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        started = time.perf_counter()

        async def lane():
            nonlocal tokens, chunks
            for _ in todo:
                try:
                    first, e2e, n, k = await one_request(c, body)
                except (RuntimeError, http_error, asyncio.TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    print(f"failed: {errors[-1]}", file=sys.stderr)
                    continue
                if first is not None:
                    ttfts.append(first)
                e2es.append(e2e)
                tokens += n
                chunks += k

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return {"started": started, "ended": time.perf_counter(), "ttfts": ttfts, "e2es": e2es, "tokens": tokens,
            "chunks": chunks, "errors": errors}


def _client_process(args, requests: int, concurrency: int, ready, results) -> None:
    results.put(asyncio.run(lanes(args, requests, concurrency, ready)))


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run(args) -> dict:
    """The load from ``--procs`` client processes (one asyncio loop each): a single Python client
    parses a few thousand SSE chunks a second, so with one process the client, not the server,
    would set the figure."""
    procs = max(1, min(args.procs, args.concurrency))
    if procs == 1:
        parts = [asyncio.run(lanes(args, args.requests, args.concurrency))]
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, results = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=_client_process, args=(args, r, c, ready, results))
                   for r, c in zip(spread(args.requests, procs), spread(args.concurrency, procs))]
        for w in workers:
            w.start()
        parts = [results.get() for _ in workers]
        for w in workers:
            w.join()
    # perf_counter is the system-wide monotonic clock on Linux, so the processes' times compare.
    elapsed = max(p["ended"] for p in parts) - min(p["started"] for p in parts)
    ttfts = [t for p in parts for t in p["ttfts"]]
    e2es = [t for p in parts for t in p["e2es"]]
    errors = [e for p in parts for e in p["errors"]]
    tokens = sum(p["tokens"] for p in parts)
    chunks = sum(p["chunks"] for p in parts)
    return {"base_url": args.base_url, "model": args.model, "client": args.client, "concurrency": args.concurrency,
            "client_procs": procs,
            "requests": args.requests, "failures": len(errors), "error_sample": errors[:5],
            "max_tokens": args.max_tokens, "elapsed_s": round(elapsed, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 1),
            "chunks_per_s": round(chunks / elapsed, 1), "chunks_per_request": round(chunks / max(1, len(e2es)), 1),
            "requests_per_s": round(len(e2es) / elapsed, 2),
            "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1), "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1),
            "e2e_p50_ms": round(percentile(e2es, 50) * 1e3, 1), "e2e_p99_ms": round(percentile(e2es, 99) * 1e3, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--client", choices=("httpx", "light"), default="httpx",
                   help="httpx parses every event (default); light counts them in the bytes (CPU runs)")
    p.add_argument("--procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="client processes the streams are spread over (default: half the cores, at most 8)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
