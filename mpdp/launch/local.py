"""Local workers: each a fresh interpreter (``python -c``) in a process group of its own.

Like multiprocessing's ``spawn`` nothing is inherited but the environment; unlike it, the
caller's ``__main__`` is never re-imported, so scripts without an ``if __name__ ==
"__main__"`` guard and notebooks work. Death is watched through a pidfd, which the
dispatcher polls next to its sockets (the role of multiprocessing's process sentinel).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from mpdp.launch.base import Launcher, WorkerHandle
from mpdp.worker.spec import WorkerSpec

# The child reads its WorkerSpec from stdin; it imports mpdp from where the parent did.
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from mpdp.worker.loop import main; main()"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, config):
        self.log_dir = tempfile.mkdtemp(prefix="mpdp-logs-") if config.worker_logs == "file" else None
        self.cleanup_paths = [self.log_dir] if self.log_dir else []
        self._owner_pid = os.getpid()

    def launch(self, spec: WorkerSpec, log_name: str) -> "LocalWorker":
        log_path = os.path.join(self.log_dir, log_name) if self.log_dir else None
        return LocalWorker(spec, log_path)

    def close(self) -> None:
        # A forked child inherits this object: only the process that made the folder removes it.
        if self.log_dir and os.getpid() == self._owner_pid:
            shutil.rmtree(self.log_dir, ignore_errors=True)


class LocalWorker(WorkerHandle):
    """A worker's OS process: its Popen, and a pidfd that becomes readable when it exits."""

    def __init__(self, spec: WorkerSpec, log_path: str | None):
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else None
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_ROOT], stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True,          # its own group: killpg reaches engine subprocesses
                close_fds=True)
        finally:
            if out:
                out.close()
        self.pid = self.popen.pid
        self._reaped = False
        try:
            self._sentinel = os.pidfd_open(self.pid)
            self.popen.stdin.write(spec.to_json().encode())
            self.popen.stdin.close()
        except OSError:
            self.kill()
            self.popen.wait()
            raise

    @property
    def sentinel(self) -> int:
        return self._sentinel

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL the worker's whole group, unless it is reaped: its pid may be someone else's by now."""
        if not self._reaped:
            killpg(self.pid)

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def reap(self, timeout: float) -> None:
        if self._reaped:
            return
        self.join(timeout)
        # Engine subprocesses a crash left behind share the group. While any of them lives the
        # group id stays reserved, so this signal cannot reach a stranger; after it, never again.
        killpg(self.pid)
        if self.popen.poll() is None:
            self.popen.wait()
        self._reaped = True
        if self._sentinel >= 0:
            os.close(self._sentinel)
            self._sentinel = -1

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def killpg(pid: int | None) -> None:
    """SIGKILL a process group whose leader is ``pid`` (mpdp's workers lead their own)."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ids to put in CUDA_VISIBLE_DEVICES (the parent's list if set)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
        except (OSError, subprocess.SubprocessError):
            pass
    return []
