"""What the subcommands (``mpdp generate``, ``mpdp serve``) share: every pool flag (declared by
``PoolConfig``'s fields, so both list the same ones), the sampling-default flags (their defaults
from the door's row of ``mpdp.defaults``), and argument types that refuse a bad value with a
one-line argparse error naming it."""

from __future__ import annotations

import argparse

from mpdp.config import POOL_FIELDS, PoolConfig, check_sampling, parse_pair
from mpdp.config import positive_int as positive, positive_seconds as seconds   # noqa: F401 (the subcommands')
from mpdp.defaults import door_defaults

# The sampling defaults a subcommand takes as flags (each request may still override them).
SAMPLING_FLAGS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=JSON`` (a bare string where it is not JSON, e.g. dtype=float16); ValueError if no KEY=."""
    return parse_pair(text, True)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pool`` group: every PoolConfig field that has a command-line form."""
    PoolConfig.add_cli_args(parser.add_argument_group("pool"))


def add_sampling_arguments(parser: argparse.ArgumentParser, door: str | dict[str, str]) -> None:
    """The ``sampling defaults`` group, its defaults the door's row of ``mpdp.defaults``; a door
    with a row per endpoint (``{"chat": "serve_chat", ...}``) leaves a flag unset where its rows
    differ, and each endpoint fills in its own."""
    group = parser.add_argument_group("sampling defaults (each request may override them)")
    rows = {"": door_defaults(door)} if isinstance(door, str) else \
        {label: door_defaults(d) for label, d in door.items()}
    for name, kind in SAMPLING_FLAGS.items():
        shown = {label: row.describe(name) for label, row in rows.items()}
        if len(set(shown.values())) == 1:
            default, text = next(iter(rows.values())).get(name), next(iter(shown.values()))
        else:
            default, text = None, "; ".join(f"{label}: {value}" for label, value in shown.items())
        group.add_argument(flag_of(name), dest=name, type=_number(kind), default=default,
                           help=f"(default: {text.replace('%', '%%')})")


def _number(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants {'an int' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The sampling flags' values, checked (ValueError/TypeError naming the field); None left out."""
    return check_sampling({k: v for k in SAMPLING_FLAGS if (v := getattr(args, k, None)) is not None})


def pool_config(args: argparse.Namespace, **overrides) -> PoolConfig:
    """The PoolConfig the command line names, its engine's options checked (all in this process,
    before any worker starts). ValueError/TypeError with the flag at the front of the message."""
    from mpdp.engines import check_options, check_sampling as check_for_engine
    from mpdp.pool import default_engine

    try:
        config = PoolConfig.from_cli_args(args, sampling=sampling_from_args(args), **overrides)
        engine = config.engine or default_engine()
        check_options(engine, config.engine_options)
        check_for_engine(engine, config.sampling.to_dict())
        return config
    except (ValueError, TypeError) as exc:
        raise type(exc)(named(exc)) from None


def flag_of(name: str) -> str:
    return _REPEATED.get(name) or "--" + name.replace("_", "-")


_REPEATED = {"engine_options": "--engine-option", "routing_options": "--routing-option"}


def named(exc: BaseException) -> str:
    """The error's text led by the flag it is about, where its first word names a field."""
    text = str(exc)
    first = text.split(" ", 1)[0].strip(":")
    if first in SAMPLING_FLAGS or first in POOL_FIELDS:
        return f"{flag_of(first)}: {text}"
    if text.startswith("unknown ") and " engine option" in text:
        return f"--engine-option: {text}"
    return text
