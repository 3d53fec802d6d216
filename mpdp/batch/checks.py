"""Everything ``mpdp generate`` can find wrong before a worker starts, each as one line.

Model loading takes minutes on GPUs; a typo in a path, an output that would be overwritten,
or a broken line 90,000 of the input must not wait for it. ``prepare`` checks, in this order:
the flags' values and the engine's options (``cli_args.pool_config``, as ``mpdp serve`` does),
the input can be read, the output folder can be written and an existing
output is resumed or overwritten only when asked, the model resolves, and every input line
is a line of the file's format with a unique id (one streaming pass: memory is 8 bytes an
id, see ``ids.py``). The same pass reads every request as the job will (the server's own
parser and checks, ``formats.parse``): a line that fails alone (a bad url, a temperature of
-1, a model not served) is counted and named here, before any worker starts, and answered
in its place without one. It returns the plan the job runs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from mpdp import errors
from mpdp.batch import formats, output
from mpdp.batch.ids import IdSet
from mpdp.cli_args import pool_config
from mpdp.config import PoolConfig


class UsageError(Exception):
    """A mistake in the command or its files: one line for the user, exit code 2."""


@dataclass(slots=True)
class Plan:
    fmt: str
    total: int                          # requests in the input (= unique ids)
    done: int                           # of them, already in the output (resume)
    config: PoolConfig                  # the pool: its engine named, its model resolved
    rules: formats.Rules | None = None   # what each line is checked against
    invalid: int = 0                     # lines still to do that fail alone, without a worker
    previous: output.Scan | None = None  # the existing output being resumed (None: start afresh)
    notes: list[str] = field(default_factory=list)

    @property
    def todo(self) -> int:
        return self.total - self.done

    @property
    def engine(self) -> str:
        return self.config.engine

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def sampling(self) -> dict[str, Any]:
        """The job's sampling defaults (the flags'), each line's overrides go on top."""
        return self.config.sampling.to_dict()


def prepare(args) -> Plan:
    config = _config(args)
    _check_input(args.input)
    resume = _check_output(args)
    config.engine, config.model = _resolve(config.engine, config.model, config.engine_options)
    fmt = _first_format(args.input)
    previous = None
    if resume:
        try:
            previous = output.scan(args.output, fmt)
        except output.ResumeError as exc:
            raise UsageError(str(exc)) from None
    rules = _rules(args.model, config.engine)
    total, done, invalid, first = _check_lines(args.input, fmt, rules, previous.ids if previous else None)
    plan = Plan(fmt, total, done, config, rules, invalid, previous)
    if invalid:
        plan.notes.append(f"{invalid} request{'s' if invalid > 1 else ''} will fail alone, an error in "
                          f"{'their' if invalid > 1 else 'its'} place ({first})")
    if previous is not None and previous.torn_bytes:
        plan.notes.append(f"cutting a torn last line ({previous.torn_bytes} bytes) off {args.output}")
    if previous is not None:
        plan.notes.append(f"resuming: {done} of {total} results already in {args.output}")
    return plan


def _config(args) -> PoolConfig:
    """Every pool and sampling flag, and the engine's options, checked as ``mpdp serve`` checks them."""
    try:
        return pool_config(args)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _check_input(path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise UsageError(f"cannot read --input {path}: {exc.strerror or exc}") from None


def _check_output(args) -> bool:
    """Whether there is an existing output to resume (False: the job starts the file afresh)."""
    path = args.output
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --output {path} does not exist ({folder})")
    try:                 # access() can be wrong (root, ACLs, read-only mounts): really create a file
        fd, probe = tempfile.mkstemp(prefix=".mpdp-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        if os.path.exists(path):
            open(path, "ab").close()          # appending nothing changes nothing
    except OSError as exc:
        raise UsageError(f"cannot write --output {path}: {exc.strerror or exc}") from None
    if not os.path.exists(path) or os.path.getsize(path) == 0:    # an empty file holds nothing to lose
        return False
    if args.overwrite:
        return False
    if args.resume:
        return True
    raise UsageError(f"--output {path} already exists: add --resume to finish it, or --overwrite to replace it")


def _resolve(engine: str | None, model: str, options: dict) -> tuple[str, str]:
    from mpdp.engines import resolve_model
    from mpdp.pool import default_engine

    engine = engine or default_engine()
    try:
        return engine, resolve_model(engine, model, options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise UsageError(f"--model {model}: {exc}") from None


def _rules(model: str, engine: str) -> formats.Rules:
    from mpdp.engines import engine_class

    return formats.Rules((model,), engine, engine_class(engine).sampling_fields)


def _first_format(path: str) -> str:
    try:
        for lineno, obj in formats.read_objects(path):
            return formats.detect(obj)
    except formats.FormatError as exc:
        raise UsageError(f"--input {path}: {exc}") from None
    raise UsageError(f"--input {path} holds no requests")


def _check_lines(path: str, fmt: str, rules: formats.Rules, done: IdSet | None) -> tuple[int, int, int, str]:
    """(requests, of them already done, of those to do the ones that fail alone, the first of
    them); UsageError for a line that is not one of the format, or a repeated id."""
    keys, total, already, invalid, first_invalid = IdSet(), 0, 0, 0, ""
    first_error, bad = None, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = formats.parse(formats.decode(raw, lineno), lineno, fmt, rules)
            except formats.FormatError as exc:
                first_error, bad = first_error or str(exc), bad + 1
                continue
            key = formats.id_key(item.id)
            keys.add(key)
            total += 1
            is_done = done is not None and key in done
            already += is_done
            if item.error is not None and not is_done:
                invalid += 1
                first_invalid = first_invalid or f"line {lineno}: {errors.first_line(item.error)}"
    if bad:
        more = f" ({bad} bad lines in all; the first is shown)" if bad > 1 else ""
        raise UsageError(f"--input {path}: {first_error}{more}")
    repeated = keys.freeze()
    if repeated:
        _confirm_duplicates(path, fmt, rules, repeated)
    return total, already, invalid, first_invalid


def _confirm_duplicates(path: str, fmt: str, rules: formats.Rules, repeated: set[int]) -> None:
    """The hashes say some ids repeat: find the real ids (a hash collision is not a duplicate)."""
    seen: dict[Any, int] = {}
    for lineno, obj in formats.read_objects(path):
        item = formats.parse(obj, lineno, fmt, rules)
        if formats.id_key(item.id) not in repeated:
            continue
        real = (type(item.id), item.id)
        if real in seen:
            name = "custom_id" if fmt == formats.OPENAI else "id"
            raise UsageError(f"--input {path}: {name} {item.id!r} is on line {seen[real]} and line {lineno}; "
                             "ids must be unique (resume finds results by id)")
        seen[real] = lineno
