"""The job's two files as things on disk: which file each name is, who may write the output, and
an input that can be read only once.

- ``refuse_same_file``: the output is the input (one inode, reached by the same name, a symlink,
  a hard link or ``./x`` for ``x``): starting afresh would empty the requests, resuming would take
  them for results. Refused before anything else.
- ``lock_output``: one run at a time writes an output. Two ``--resume`` runs on one file would each
  append every missing id (each id twice, out of order). The lock is ``flock`` on the output file
  itself, so it leaves nothing behind: the kernel drops it when the process dies, even by SIGKILL.
  A second run is told which process holds it (``/proc/locks`` names the pid).
- ``readable_input``: the checks read the input once, the run reads it again; a pipe
  (``--input -``, ``/dev/stdin``, a FIFO) would give the run nothing. Such an input is copied once
  into a private temporary file, unlinked at once where ``/proc/self/fd`` can reopen it (Linux), so
  not even SIGKILL leaves it behind.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import tempfile
import time

from mpdp.batch.checks import UsageError

STDIN = "-"


# -- the output is not the input --------------------------------------------------------------------
def refuse_same_file(input_name: str, output: str) -> None:
    """UsageError when ``output`` names the file ``input_name`` names (by device and inode)."""
    if input_name == STDIN and sys.stdin is None:      # closed: readable_input says so
        return
    try:
        src = os.fstat(0) if input_name == STDIN else os.stat(input_name)
        dst = os.stat(output)
    except OSError:              # one of them does not exist (yet): the checks say what is wrong, if anything
        return
    if (src.st_dev, src.st_ino) == (dst.st_dev, dst.st_ino):
        shown = "standard input" if input_name == STDIN else input_name
        raise UsageError(f"--output {output} is the input file ({shown}, by its inode): the results would "
                         "overwrite the requests; choose another output file")


# -- one run writes an output -----------------------------------------------------------------------
class OutputLock:
    """An exclusive ``flock`` on the output file, held until ``release``."""

    def __init__(self, path: str, fd: int, created: bool):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        """Unlock; an output this run created and never wrote to is removed first (still locked,
        so a run waiting to take it over finds it gone and makes its own)."""
        if self.fd < 0:
            return
        try:
            if (self.created and os.fstat(self.fd).st_size == 0 and not os.path.islink(self.path)
                    and _same_file(self.fd, self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def lock_output(path: str) -> OutputLock | None:
    """Take the output's lock (creating an empty output if there is none), or UsageError naming
    the run that holds it. None where the output cannot be opened at all (a missing folder, no
    permission): the checks that follow say what is wrong in their own words."""
    for _ in range(100):                           # only a file made and removed again and again loops
        created = False
        try:
            fd = os.open(path, os.O_RDONLY)        # non-inheritable: workers never hold the lock
        except FileNotFoundError:
            # O_EXCL: if another run makes it at this moment, this one opens that file instead.
            # A dangling symlink is made through (its target is the output, as open() would).
            excl = 0 if os.path.islink(path) else os.O_EXCL
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | excl, 0o666)
                created = True
            except FileExistsError:
                continue
            except OSError:
                return None
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):   # /dev/null, a FIFO: nothing to resume, nothing to guard
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--output {path} is being written by another run ({holder(path)}); "
                             "wait for it to end, or stop it and rerun with --resume") from None
        except OSError as exc:                    # a file system without locks: say so, do not pretend
            os.close(fd)
            raise UsageError(f"cannot lock --output {path} against a second run: {exc.strerror or exc}") from None
        # Between open and flock the run that held the file may have removed it (an output it had
        # created and never written): the lock is then on a file no one will read. Start again.
        if _same_file(fd, path):
            return OutputLock(path, fd, created)
        os.close(fd)
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def holder(path: str) -> str:
    """Who holds the flock on ``path``: "pid N, started at T" from /proc (Linux), else a plain word."""
    try:
        st = os.stat(path)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2146325 0 EOF" ("->" marks a waiter)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" and fields[5] == want:
                    pid = int(fields[4])
                    started = _started(pid)
                    return f"pid {pid}, started {started}" if started else f"pid {pid}"
    except (OSError, ValueError):
        pass
    return "another process"


def _started(pid: int) -> str | None:
    """The local start time of process ``pid`` (from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])      # field 22: start, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    at = boot + ticks / os.sysconf("SC_CLK_TCK")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


# -- an input read once -----------------------------------------------------------------------------
class Input:
    """The input as the job reads it: ``path`` can be opened as often as needed; ``name`` is what
    the user gave (for messages). ``close`` removes a private copy."""

    def __init__(self, name: str, path: str, fd: int = -1, temp: str | None = None):
        self.name, self.path, self._fd, self._temp = name, path, fd, temp

    @property
    def copied(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except OSError:
                pass
            self._temp = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def readable_input(name: str) -> Input:
    """``name`` itself for a regular file; a private copy of a pipe, FIFO, terminal or ``-``, read
    to its end once. Anything that cannot be opened is passed on for the checks to report."""
    if name != STDIN:
        try:
            mode = os.stat(name).st_mode
        except OSError:
            return Input(name, name)
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
            return Input(name, name)
    if name == STDIN and sys.stdin is None:   # fd 0 was closed when Python started: 0 may be any file now
        raise UsageError("cannot read --input -: standard input is closed")
    try:
        source = open(0 if name == STDIN else name, "rb", closefd=name != STDIN)
    except OSError as exc:
        raise UsageError(f"cannot read --input {name}: {exc.strerror or exc}") from None
    with source:
        try:
            fd, temp = tempfile.mkstemp(prefix="mpdp-input-", suffix=".jsonl")
        except OSError as exc:
            raise UsageError(f"cannot copy --input {name}: no temporary file in {tempfile.gettempdir()} "
                             f"({exc.strerror or exc}); set TMPDIR") from None
        copy = Input(name, temp, fd, temp)
        try:
            reopen = f"/proc/self/fd/{fd}"
            if os.path.exists(reopen):         # readable by that name while open: unlink it now
                os.unlink(temp)
                copy.path, copy._temp = reopen, None
            with open(fd, "wb", closefd=False) as sink:
                _copy(name, source, sink)
        except BaseException:                  # SIGINT (Stop), a full disk, a read error: no copy left
            copy.close()
            raise
    return copy


def _copy(name: str, source, sink) -> None:
    while True:
        try:
            chunk = source.read(1 << 20)
        except OSError as exc:
            raise UsageError(f"cannot read --input {name}: {exc.strerror or exc}") from None
        if not chunk:
            return
        try:
            sink.write(chunk)
        except OSError as exc:
            raise UsageError(f"cannot copy --input {name} into {tempfile.gettempdir()}: "
                             f"{exc.strerror or exc} (set TMPDIR to a folder with room)") from None
