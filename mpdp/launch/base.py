"""The launcher interface: how the supervisor gets worker processes, wherever they run.

The supervisor decides *when* a slot starts, dies and restarts; a launcher decides *where and
how*: a local process (``local.py``), a Ray actor on some node of a cluster (``ray.py``).
What comes back is a ``WorkerHandle``:

    sentinel        a file descriptor that becomes readable when the worker is gone: a pidfd
                    locally, a pipe fed by a watcher thread for remote workers. The dispatcher
                    polls it next to its sockets, so a death is seen at once.
    kill()          end the worker and everything it started; idempotent, and a no-op once
                    reaped (a reaped pid may already belong to someone else)
    reap(timeout)   after the sentinel fired: collect the exit, clean up, close the sentinel
    exitcode        as multiprocessing reports it (negative: a signal); None while running
    log_tail(n)     the last lines the worker printed, for error reports
"""

from __future__ import annotations

import abc

from mpdp.worker.spec import WorkerSpec


class WorkerHandle(abc.ABC):
    pid: int | None = None
    node: str | None = None

    @property
    @abc.abstractmethod
    def sentinel(self) -> int: ...

    @property
    @abc.abstractmethod
    def exitcode(self) -> int | None: ...

    @abc.abstractmethod
    def kill(self) -> None: ...

    @abc.abstractmethod
    def reap(self, timeout: float) -> None: ...

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the worker to end by itself (after a SHUTDOWN)."""

    def log_tail(self, lines: int = 20) -> str:
        return ""


class Launcher(abc.ABC):
    """Starts workers. One per pool; ``close()`` releases whatever it holds (folders, placement groups)."""

    name: str = ""
    # The dispatcher binds here: "127.0.0.1" for local workers, a routable address for remote ones.
    bind_host: str = "127.0.0.1"
    # Folders a local worker removes when it sees the pool's process die (nothing else could).
    cleanup_paths: list[str]

    @abc.abstractmethod
    def launch(self, spec: WorkerSpec, log_name: str) -> WorkerHandle:
        """Start one worker; raise OSError (or a subclass) if it cannot be started at all."""

    def close(self) -> None:
        pass
