"""The output file: what a previous run left (resume), repairing a torn last line, durable writes.

A run killed with SIGKILL (or a machine that lost power) can leave a last line cut short: it is
the only thing after the last newline, because every result is written as one ``line + "\\n"``.
``scan`` reads the ids already written and where the good part ends; ``open_for_append`` cuts
the torn tail off before anything new is appended. Any other line that is not a result of this
job's format is an error: resume never guesses about a file it does not understand.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

from mpdp.batch import formats
from mpdp.batch.ids import IdSet

# One output line to write: (the line, its completion tokens, the worker that made it or None for
# a request that failed).
Row = tuple[dict, int, int | None]


class ResumeError(Exception):
    """The existing output cannot be resumed (the message is one line for the user)."""


@dataclass(slots=True)
class Scan:
    ids: IdSet
    lines: int                 # complete result lines
    good_end: int              # byte offset where the complete lines end
    size: int                  # the file's size now
    needs_newline: bool        # the last line is complete JSON but its newline was never written

    @property
    def torn_bytes(self) -> int:
        return self.size - self.good_end


def scan(path: str, fmt: str) -> Scan:
    """Ids already written to ``path`` by a run on a file of format ``fmt`` (streaming)."""
    ids, lines, offset, good_end, needs_newline = IdSet(), 0, 0, 0, False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            offset += len(raw)
            complete = raw.endswith(b"\n")
            if not raw.strip():
                good_end = offset if complete else good_end
                continue
            item_id = _row_id(raw, fmt)
            if item_id is None:
                if not complete:            # the torn tail of a killed run: cut off below
                    break
                raise ResumeError(f"line {lineno} of {path} is not a {fmt}-format result line; "
                                  "cannot resume into it (use --overwrite to replace the file)")
            ids.add(formats.id_key(item_id))
            lines += 1
            good_end = offset
            needs_newline = not complete
    ids.freeze()
    return Scan(ids, lines, good_end, offset, needs_newline)


def _row_id(raw: bytes, fmt: str):
    try:
        return formats.output_id(json.loads(raw), fmt)
    except ValueError:
        return None


def open_for_append(path: str, found: Scan) -> BinaryIO:
    """Cut a torn last line off and open for appending after the last complete one."""
    if found.torn_bytes:
        os.truncate(path, found.good_end)
    f = open(path, "ab")
    if found.needs_newline:
        f.write(b"\n")
    return f


def _encode(row: dict) -> bytes:
    """One output line. A lone surrogate (``"\\ud800"`` in an input line, carried or echoed) has no
    UTF-8 form: that line is written with JSON escapes instead, which read back as the same string."""
    try:
        return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(row).encode("ascii") + b"\n"


class DurableWriter:
    """Writes lines as they come, flushes after every batch and fsyncs every ``fsync_every`` seconds.

    ``written`` is always the number of complete lines this writer put in the file. Each batch goes
    to the file descriptor directly (``os.write``, no buffer that could still hold part of it): when
    a write fails part-way (ENOSPC, EFBIG), the complete lines that landed are counted, the torn one
    is cut off, and the error is raised. ``on_written(rows)`` runs for exactly the rows counted, after
    they are in the file, so whatever it shows (the progress bar) never counts a line that is not.
    """

    def __init__(self, f: BinaryIO, fsync_every: float = 5.0,
                 on_written: Callable[[list[Row]], None] | None = None):
        self.f, self.fsync_every, self.on_written = f, fsync_every, on_written
        f.flush()                  # what the file object holds (a repaired newline) goes first
        self._fd = f.fileno()
        try:
            self._end = os.lseek(self._fd, 0, os.SEEK_END)  # where the next line starts
        except OSError:            # a pipe or a terminal (--output /dev/stdout): nothing to cut back
            self._end = 0
        self.written = 0
        self._dirty = False
        self._last_sync = time.monotonic()

    def write(self, rows: list[Row]) -> None:
        """``rows``: (output line, completion tokens, worker or None for an error line), in file order."""
        if not rows:
            return
        lines = [_encode(row) for row, _, _ in rows]
        data = b"".join(lines)
        landed = 0
        try:
            view = memoryview(data)
            while landed < len(data):
                landed += os.write(self._fd, view[landed:])
        except OSError:
            self._count_partial(rows, lines, landed)
            raise
        self._count(rows, len(data))
        self.maybe_sync()

    def _count_partial(self, rows: list[Row], lines: list[bytes], landed: int) -> None:
        """After a failed write: count the complete lines among the ``landed`` bytes; cut the rest."""
        n, size = 0, 0
        while n < len(lines) and size + len(lines[n]) <= landed:
            size += len(lines[n])
            n += 1
        if landed > size:
            try:                   # a torn line: --resume would cut it too, but the file says what we say
                os.ftruncate(self._fd, self._end + size)
                os.lseek(self._fd, 0, os.SEEK_END)
            except OSError:
                pass
        self._count(rows[:n], size)

    def _count(self, rows: list[Row], size: int) -> None:
        if not rows:
            return
        self._end += size
        self.written += len(rows)
        self._dirty = True
        if self.on_written is not None:
            self.on_written(rows)

    def maybe_sync(self) -> None:
        """fsync when the last one is ``fsync_every`` seconds old (also called while waiting)."""
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:     # EINVAL: not a file that can be synced (/dev/null, a pipe)
                raise
        self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            try:
                self.sync()
            finally:
                self.f.close()
