"""A streaming client load against any OpenAI-compatible base URL: output tokens/s and TTFT.

Run the same load against ``mpdp serve --engine vllm`` and ``vllm serve`` (same GPU, same
model) to compare them: N concurrent streaming chat requests, each a fixed output length
(``ignore_eos``, which both servers accept), until ``--requests`` are done.

    python -m bench.serve_vs_vllm --base-url http://127.0.0.1:8000/v1 --model M \\
        --concurrency 256 --requests 2048 --max-tokens 256 --json out.json

Output tokens are counted from each stream's usage chunk (``stream_options.include_usage``);
TTFT is the time from sending a request to its first non-empty content delta.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx


def percentile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100)[q - 1]


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float | None, float, int]:
    sent = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - sent, tokens


async def run(args) -> dict:
    prompt = ("Write a long story about a lighthouse keeper. " * max(1, args.prompt_words // 8)).strip()
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    ttfts, e2es, tokens, failures = [], [], 0, 0
    todo = iter(range(args.requests))
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=args.timeout, headers=headers) as c:
        await one(c, dict(body, max_tokens=4))          # warm-up (connections, compiled graphs)
        started = time.perf_counter()

        async def lane():
            nonlocal tokens, failures
            for _ in todo:
                try:
                    first, e2e, n = await one(c, body)
                except (RuntimeError, httpx.HTTPError) as exc:
                    failures += 1
                    print(f"failed: {exc}", file=sys.stderr)
                    continue
                if first is not None:
                    ttfts.append(first)
                e2es.append(e2e)
                tokens += n

        await asyncio.gather(*(lane() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    return {"base_url": args.base_url, "model": args.model, "concurrency": args.concurrency,
            "requests": args.requests, "failures": failures, "max_tokens": args.max_tokens,
            "elapsed_s": round(elapsed, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(len(e2es) / elapsed, 2),
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
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
