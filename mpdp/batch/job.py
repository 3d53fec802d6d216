"""Running a batch job: checks, the pool, the submit/write loop, clean stops, the summary.

Before anything else the job makes sure its files are safe to use (``files``): the output is not
the input, no other run writes the output (a lock held until this run exits), and an input that
can be read only once (a pipe) is copied so the checks and the run read the same requests.

Exit codes: 0 every request succeeded; 1 some failed alone (their errors are in the output) or
the pool itself failed; 2 a mistake found before any worker started; 128 + the signal number
(130 SIGINT, 143 SIGTERM) when stopped. A stop never loses what was finished in order: the
written prefix is flushed and fsynced, the rest is aborted, and ``--resume`` finishes it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import CancelledError, Future

from mpdp import errors
from mpdp.batch import checks, files, formats, output
from mpdp.batch.progress import Progress, worker_table
from mpdp.batch.window import OrderedWindow

_WAIT_S = 0.2            # how often the loop looks at the stop flag and the fsync clock while waiting
_DRAIN_EVERY = 64        # submissions between looks at finished heads while the window fills


class Stop(BaseException):
    """Raised by the signal handler while the job cannot just look at a flag (checks, pool start)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT/SIGTERM handlers. Before the pool runs they raise Stop (a model load can take
    minutes); once it runs they only record, and the loop stops between two writes, so a
    signal never lands in the middle of a line or of ``pool.close()``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._old = {}
        # Only the main thread may set handlers (main() called from another thread: no clean stops).
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum          # the first signal names the exit code
        if not self.deferred:
            raise Stop(signum)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class PoolFailure(Exception):
    """The pool cannot go on (not one request's failure): stop, keep what was written."""


def run(args) -> int:
    signals, plan, lock, source = Signals(), None, None, None
    try:
        files.refuse_same_file(args.input, args.output)
        lock = files.lock_output(args.output)         # before the resume scan reads the output
        source = files.readable_input(args.input)
        plan = _prepare(args, source)
        return _run(_reading(args, source), plan, signals)
    except checks.UsageError as exc:
        print(f"mpdp generate: error: {exc}", file=sys.stderr)
        return 2
    except Stop as stop:                        # during the checks or while the workers started
        _say(f"stopped by {signal.Signals(stop.signum).name} before the workers were ready")
        if plan is not None:
            _say(f"wrote {plan.done} of {plan.total} results; rerun with --resume to finish")
        return 128 + stop.signum
    finally:
        signals.restore()
        if source is not None:
            source.close()
        if lock is not None:
            lock.release()


def _reading(args, source: files.Input):
    """``args`` with ``--input`` the file the job reads (a pipe's private copy)."""
    return argparse.Namespace(**{**vars(args), "input": source.path}) if source.copied else args


def _prepare(args, source: files.Input) -> checks.Plan:
    try:
        return checks.prepare(_reading(args, source))
    except checks.UsageError as exc:
        if not source.copied:
            raise
        # The checks name the file they read: say what the user gave instead of the copy's name.
        raise checks.UsageError(str(exc).replace(source.path, source.name)) from None


def _say(message: str) -> None:
    print(f"mpdp: {message}", file=sys.stderr, flush=True)


def _run(args, plan: checks.Plan, signals: Signals) -> int:
    for note in plan.notes:
        _say(note)
    if plan.todo == 0:
        if plan.previous is not None:
            output.open_for_append(args.output, plan.previous).close()   # a torn tail goes all the same
        _say(f"nothing to do: all {plan.total} results are in {args.output}")
        return 0
    if plan.todo == plan.invalid:        # every request left fails alone: no worker needed
        return _write_all(args, plan, None, signals)
    from mpdp.pool import Pool           # not before: the checks above must stay fast

    started = time.monotonic()
    try:
        pool = Pool(config=plan.config)
    except (ValueError, TypeError) as exc:      # raised before any worker was started
        print(f"mpdp generate: error: {exc}", file=sys.stderr)
        return 2
    except errors.MpdpError as exc:
        _say(f"error: the workers did not start: {errors.first_line(exc)}")
        return 1
    try:
        signals.deferred = True
        if signals.signum is not None:          # arrived between the pool's start and here
            raise Stop(signals.signum)
        _say(f"{pool.num_workers} {pool.engine} workers ready in {time.monotonic() - started:.1f}s ({args.model})")
        return _write_all(args, plan, pool, signals)
    finally:
        pool.close(wait=False)                  # aborts what is left, stops workers, removes temp folders


def _write_all(args, plan: checks.Plan, pool, signals: Signals) -> int:
    # From here a signal only stops the loop between two writes, with or without workers (every
    # line may fail alone: then none runs), so the summary counts what is in the file.
    signals.deferred = True
    if signals.signum is not None:
        raise Stop(signals.signum)
    f = output.open_for_append(args.output, plan.previous) if plan.previous else open(args.output, "wb")
    progress = Progress(plan.total, plan.done, enabled=not args.no_progress)
    writer = output.DurableWriter(f, args.fsync_every, progress.advance)
    window = OrderedWindow(args.window, _render, writer)
    started, failure = time.monotonic(), None
    try:
        _loop(_todo(args.input, plan), window, writer, pool, signals)
    except (PoolFailure, OSError) as exc:       # OSError: the disk filled up, the file system went away
        failure = exc
    except formats.FormatError as exc:          # checked before the run: the input changed since
        failure = formats.FormatError(f"the input changed during the run: {exc}")
    finally:
        if failure is None:
            try:
                window.drain()                  # what finished before the stop, in order
            except (PoolFailure, OSError) as exc:
                failure = exc
        aborted, dropped = window.cancel_all()  # cancel() also aborts each request in its engine
        try:
            writer.close()                      # fsync what was written
        except OSError as exc:
            failure = failure or exc
        progress.close()
    elapsed = time.monotonic() - started
    # The summary and the table both count the rows the writer put in the file (progress is told
    # of exactly those), so the two always agree, and agree with the file.
    written = plan.done + writer.written
    failed = progress.failures
    _say(f"this run wrote {writer.written} results ({failed} failed) in {elapsed:.1f}s -> {args.output}; "
         f"{writer.written / max(elapsed, 1e-9):,.1f} results/s, "
         f"{progress.tokens / max(elapsed, 1e-9):,.0f} output tokens/s")
    print(worker_table(progress, pool.stats() if pool is not None else {"workers": []}), file=sys.stderr)
    if signals.signum is not None or failure is not None:
        why = f"stopped by {signal.Signals(signals.signum).name}" if signals.signum is not None \
            else f"error: {errors.first_line(failure)}"
        _say(f"{why}; {aborted} unfinished requests aborted")
        if dropped:
            _say(f"{dropped} finished requests not written: they came after an unfinished one "
                 "(the output keeps input order)")
        _say(f"wrote {written} of {plan.total} results; rerun with --resume to finish")
        return 128 + signals.signum if signals.signum is not None else 1
    if written < plan.total:       # an id taken for done was not (a shared 64-bit hash, ids.py)
        _say(f"wrote {written} of {plan.total} results; rerun with --resume to finish")
        return 1
    return 0 if failed == 0 else 1


def _loop(items, window: OrderedWindow, writer: output.DurableWriter, pool, signals: Signals) -> None:
    exhausted = False
    while signals.signum is None:
        since_drain = 0
        while not exhausted and not window.full and signals.signum is None:
            item = next(items, None)
            if item is None:
                exhausted = True
                break
            window.push(item, _submit(pool, item))
            since_drain += 1
            if since_drain >= _DRAIN_EVERY:     # write finished heads while the window fills
                window.drain()
                since_drain = 0
        window.drain()
        if exhausted and not len(window):
            return
        if window.full or exhausted:
            window.wait_head(_WAIT_S)
            writer.maybe_sync()


def _todo(path: str, plan: checks.Plan):
    """The second pass: the input's requests not in the output yet, in input order."""
    done = plan.previous.ids if plan.previous else None
    for lineno, obj in formats.read_objects(path):
        item = formats.parse(obj, lineno, plan.fmt, plan.rules)
        if done is None or formats.id_key(item.id) not in done:
            yield item


def _submit(pool, item: formats.Item) -> Future:
    """The line's pool requests as one future: of a Completion, or of the list of them when a
    completions prompt list made several; a line that fails alone gets a future that already
    holds its error."""
    if item.error is not None:
        return _failed(item.error)
    futures: list[Future] = []
    try:
        for call in item.calls:
            futures.append(pool.submit(**call))
    except (ValueError, TypeError) as exc:    # a bad request fails alone, in its place
        _cancel(futures)
        return _failed(exc)
    except (errors.PoolClosed, errors.PoolBroken) as exc:
        _cancel(futures)
        raise PoolFailure(errors.first_line(exc)) from exc
    return futures[0] if len(futures) == 1 else _gather(futures)


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _cancel(futures: list[Future]) -> None:
    for f in futures:
        f.cancel()


def _gather(futures: list[Future]) -> Future:
    """One future of the list of results, failed with the first error; cancelling it cancels
    (and so aborts in their engines) the parts."""
    whole: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def part_done(f: Future) -> None:
        with lock:
            if whole.done():
                return
            if f.cancelled() or f.exception() is not None:
                exc = f.exception() if not f.cancelled() else CancelledError("the request was cancelled")
                whole.set_exception(exc)
                _cancel(futures)
                return
            left[0] -= 1
            if left[0] == 0:
                whole.set_result([p.result() for p in futures])

    whole.add_done_callback(lambda w: w.cancelled() and _cancel(futures))
    for f in futures:
        f.add_done_callback(part_done)
    return whole


def _render(item: formats.Item, outcome):
    if isinstance(outcome, (errors.PoolClosed, errors.PoolBroken)):
        raise PoolFailure(errors.first_line(outcome))
    if isinstance(outcome, BaseException):
        return formats.error_row(item, outcome), 0, None
    completions = outcome if isinstance(outcome, list) else [outcome]
    # A line of several prompts is one result: counted on its first request's worker.
    return formats.result_row(item, completions), sum(c.completion_tokens for c in completions), completions[0].worker
