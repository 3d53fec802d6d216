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
