"""The command line: ``mpdp generate --input FILE.jsonl --output OUT.jsonl``.

Each input line is ``{"id", "prompt"}`` or ``{"id", "messages"}`` with optional sampling fields;
each output line is ``{"id", "text", "finish_reason", "usage"}`` (or ``{"id", "error"}`` for a
request that failed alone), in input order. Input is streamed: memory stays bounded whatever
the file's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterator

from mpdp.pool import DEFAULT_MODEL, Pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpdp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run a JSONL file of requests through a pool")
    gen.add_argument("--input", required=True, help="JSONL, one request a line")
    gen.add_argument("--output", required=True, help="JSONL results, in input order")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="model name or local folder (default: %(default)s)")
    gen.add_argument("--engine", default=None, help="vllm | hf | echo (default: vllm with GPUs, else hf)")
    gen.add_argument("--num-workers", type=int, default=None, help="CPU workers (hf/echo engines)")
    gen.add_argument("--num-gpus", type=int, default=None, help="GPUs to use (vllm engine)")
    gen.add_argument("--tensor-parallel-size", type=int, default=1)
    gen.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                     help="engine option, e.g. max_model_len=4096 (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return _generate(args)


def _generate(args) -> int:
    options = dict(_option(o) for o in args.engine_option)
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.top_p is not None:
        defaults["top_p"] = args.top_p
    total = _count_lines(args.input)
    started = time.monotonic()
    with Pool(args.model, engine=args.engine, num_workers=args.num_workers, num_gpus=args.num_gpus,
              tensor_parallel_size=args.tensor_parallel_size, engine_options=options, **defaults) as pool:
        print(f"mpdp: {pool.num_workers} {pool.engine} workers ready in {time.monotonic() - started:.1f}s "
              f"({pool.model})", file=sys.stderr)
        ids: list[Any] = []
        bad_lines: dict[int, str] = {}
        progress = _Progress(total, enabled=not args.no_progress)
        failed = 0
        with open(args.output, "w", encoding="utf-8") as out:
            results = pool.imap(_requests(args.input, ids, bad_lines), return_exceptions=True)
            for i, result in enumerate(results):
                if isinstance(result, BaseException):
                    failed += 1
                    row = {"id": ids[i], "error": bad_lines.get(i, f"{type(result).__name__}: {result}")}
                else:
                    row = {"id": ids[i], "text": result.text, "finish_reason": result.finish_reason,
                           "usage": {"prompt_tokens": result.prompt_tokens,
                                     "completion_tokens": result.completion_tokens}}
                    if len(result.choices) > 1:
                        row["choices"] = result.choices
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                progress.update(i + 1)
        progress.close()
        elapsed = time.monotonic() - started
        stats = pool.stats()
    print(f"mpdp: {total} requests ({failed} failed) in {elapsed:.1f}s -> {args.output}", file=sys.stderr)
    for w in stats["workers"]:
        print(f"  worker {w['index']}: {w['requests']} requests, {w['tokens']} completion tokens, "
              f"{w['restarts']} restarts", file=sys.stderr)
    return 0 if failed == 0 else 1


def _requests(path: str, ids: list, bad_lines: dict[int, str]) -> Iterator[dict]:
    """Requests from a JSONL file; a line that is not a JSON object becomes a request that fails alone."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                bad_lines[len(ids)] = f"ValueError: line {n} of {path} is not a JSON object: {exc}"
                item = {}                 # fails alone in the pool (no prompt), reported as above
            ids.append(item.pop("id", n))
            yield item


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--engine-option wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = max(total, 1), enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        interval = 0.1 if self.tty else 10.0       # a log file gets a line every 10 s, not a bar
        if not self.enabled or (now - self.last < interval and done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.started, 1e-9)
        end = "" if self.tty else "\n"
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {rate:.1f} req/s{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())
