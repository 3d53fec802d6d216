"""A streaming client load against any OpenAI-compatible base URL: output tokens/s and TTFT.

Run the same load against ``mpdp serve --engine vllm`` and ``vllm serve`` (same GPU, same
model) to compare them: N concurrent streaming chat requests, each a fixed output length
(``ignore_eos``, which both servers accept), until ``--requests`` are done.

    python -m bench.serve_vs_vllm --base-url http://127.0.0.1:8000/v1 --model M \\
        --concurrency 256 --requests 2048 --max-tokens 256 --json out.json

Output tokens are counted from each stream's usage chunk (``stream_options.include_usage``);
TTFT is the time from sending a request to its first non-empty content delta. Chunks are the
events with content: a server that joins the deltas waiting for a slow client sends fewer.
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


def _client(args, headers: dict):
    """(an async context of a connection pool, its one-request function, the errors it raises)."""
    if args.client == "light":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=args.concurrency)
        session = aiohttp.ClientSession(connector=connector, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=args.timeout))
        return _WithURL(session, args.base_url.rstrip("/") + "/chat/completions"), one_light, aiohttp.ClientError
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    return httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=args.timeout, headers=headers), one, \
        httpx.HTTPError


async def run(args) -> dict:
    prompt = ("Write a long story about a lighthouse keeper. " * max(1, args.prompt_words // 8)).strip()
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ttfts, e2es, tokens, chunks, failures = [], [], 0, 0, 0
    todo = iter(range(args.requests))
    pool, one_request, http_error = _client(args, headers)
    async with pool as c:
        await one_request(c, dict(body, max_tokens=4))   # warm-up (connections, compiled graphs)
        started = time.perf_counter()

        async def lane():
            nonlocal tokens, chunks, failures
            for _ in todo:
                try:
                    first, e2e, n, k = await one_request(c, body)
                except (RuntimeError, http_error, asyncio.TimeoutError) as exc:
                    failures += 1
                    print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                if first is not None:
                    ttfts.append(first)
                e2es.append(e2e)
                tokens += n
                chunks += k

        await asyncio.gather(*(lane() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    return {"base_url": args.base_url, "model": args.model, "client": args.client, "concurrency": args.concurrency,
            "requests": args.requests, "failures": failures, "max_tokens": args.max_tokens,
            "elapsed_s": round(elapsed, 3), "output_tokens": tokens,
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
