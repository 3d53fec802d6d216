"""Argument types shared by the subcommands (``mpdp generate``, ``mpdp serve``): each refuses a bad
value with a one-line argparse error naming it."""

from __future__ import annotations

import argparse
import json


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=JSON`` (a bare string where it is not JSON, e.g. dtype=float16); ValueError if no KEY=."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_pool_arguments(pool: argparse._ArgumentGroup, *, engine_option_type=None,
                       exclusive_counts: bool = False) -> None:
    """The options every subcommand builds its pool from: model, engine, worker count, options, routing."""
    from mpdp.engines import ENGINES          # a dict of names: imports no engine
    from mpdp.models import DEFAULT_MODEL
    from mpdp.routing import POLICIES

    pool.add_argument("--model", default=DEFAULT_MODEL, help="model name or local folder (default: %(default)s)")
    pool.add_argument("--engine", default=None, choices=sorted(ENGINES),
                      help="engine (default: vllm when installed and a GPU is visible, else hf)")
    count = pool.add_mutually_exclusive_group() if exclusive_counts else pool
    count.add_argument("--num-workers", type=positive, default=None, metavar="N",
                       help="CPU workers for the hf/echo engines (default: the CPU count, at most 4)")
    count.add_argument("--num-gpus", type=positive, default=None, metavar="N",
                       help="GPUs for the vllm engine (default: every visible GPU)")
    pool.add_argument("--tensor-parallel-size", type=positive, default=1, metavar="N",
                      help="GPUs per worker (default: %(default)s)")
    pool.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                      **({"type": engine_option_type} if engine_option_type else {}),
                      help="engine option, e.g. max_model_len=4096 (repeatable)")
    pool.add_argument("--routing", default="cache_aware", choices=sorted(POLICIES),
                      help="how requests are placed on workers (default: %(default)s)")
