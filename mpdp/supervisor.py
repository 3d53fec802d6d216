"""Starting, watching and restarting worker processes. Called only from the dispatcher thread.

Each worker lives in a slot that outlives its processes: a slot is placed once (its GPUs,
its share of the CPU) and then goes through incarnations, each a new process with a new
identity. The lifecycle of a slot is an explicit state:

    STARTING ──READY──▶ READY ──death / silence──▶ DEAD ──backoff──▶ STARTING ...
        └── too many failed starts ──▶ FAILED            (and STOPPED once the pool closes)
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from mpdp.worker import WorkerSpec

RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
MAX_FAILED_STARTS = 5          # consecutive deaths before READY after which a slot is given up
STABLE_AFTER_S = 10.0          # a worker that lived this long after READY resets the backoff


class SlotState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(slots=True)
class Slot:
    index: int
    gpus: list[str] | None
    num_threads: int
    state: SlotState = SlotState.DEAD
    process: Any = None
    identity: bytes = b""
    incarnation: int = -1
    log_path: str | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    last_seen: float = 0.0
    restart_at: float = 0.0
    failed_starts: int = 0
    restarts: int = 0
    capacity: int = 0
    max_model_len: int | None = None
    last_error: str = ""            # from the worker's DEAD message, or why it was killed
    exit_reason: str = ""
    # what it served, over all incarnations
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    first_dispatch: float | None = None
    last_result: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.state in (SlotState.STARTING, SlotState.READY)


@dataclass(slots=True)
class LaunchConfig:
    engine: str
    model: str
    engine_options: dict
    heartbeat_interval: float
    log_dir: str | None              # None: workers write to the parent's stdout/stderr
    env: dict = field(default_factory=dict)


def plan_slots(num_workers: int, gpus: list[str] | None, tensor_parallel_size: int) -> list[Slot]:
    """Place workers: each gets ``tensor_parallel_size`` of ``gpus`` (or none), and a share of the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // num_workers)
    if gpus is None:
        return [Slot(i, None, threads) for i in range(num_workers)]
    k = tensor_parallel_size
    if len(gpus) < num_workers * k:
        raise ValueError(f"{num_workers} workers × tensor_parallel_size {k} need {num_workers * k} GPUs; "
                         f"{len(gpus)} available ({', '.join(gpus) or 'none'})")
    return [Slot(i, gpus[i * k:(i + 1) * k], threads) for i in range(num_workers)]


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


class Supervisor:
    """Starts each worker as a fresh interpreter (``python -c``) in a session of its own.

    Like multiprocessing's ``spawn`` nothing is inherited but the environment; unlike it, the
    caller's ``__main__`` is never re-imported, so scripts without an ``if __name__ ==
    "__main__"`` guard and notebooks work. Death is watched through a pidfd, which the
    dispatcher polls next to its sockets (the role of multiprocessing's process sentinel).
    """

    def __init__(self, slots: list[Slot], launch: LaunchConfig, endpoint: str, curve=None):
        self.slots = slots
        self.launch = launch
        self.endpoint = endpoint
        self.curve = curve

    def start(self, slot: Slot, now: float) -> None:
        slot.incarnation += 1
        spec = WorkerSpec(
            index=slot.index, incarnation=slot.incarnation, endpoint=self.endpoint,
            engine=self.launch.engine, model=self.launch.model,
            engine_options=self.launch.engine_options, gpus=slot.gpus, num_threads=slot.num_threads,
            heartbeat_interval=self.launch.heartbeat_interval, parent_pid=os.getpid(),
            curve=self.curve, env=self.launch.env)
        slot.identity = spec.identity
        slot.log_path = (os.path.join(self.launch.log_dir, f"worker{slot.index}.{slot.incarnation}.log")
                         if self.launch.log_dir else None)
        slot.process = WorkerProcess.launch(spec, slot.log_path)
        slot.state = SlotState.STARTING
        slot.started_at = slot.last_seen = now
        slot.last_error = slot.exit_reason = ""

    def kill(self, slot: Slot, reason: str) -> None:
        """SIGKILL the worker's whole process group (its engine's own subprocesses too)."""
        if not slot.exit_reason:
            slot.exit_reason = reason
        if slot.process is not None:
            _killpg(slot.process.pid)

    def reap(self, slot: Slot, now: float) -> str:
        """After the process ended: clean its group, note why it died, plan the restart. Returns the cause."""
        proc = slot.process
        proc.join(timeout=1.0)
        _killpg(proc.pid)                      # engine subprocesses left behind by a crash
        proc.close_sentinel()
        from mpdp.errors import describe_exit
        died_starting = slot.state == SlotState.STARTING
        cause = f"worker {slot.index} (pid {proc.pid}) died with {describe_exit(proc.exitcode)}"
        if slot.exit_reason:
            cause += f" after {slot.exit_reason}"
        if slot.last_error:
            cause += f"; it reported: {slot.last_error.strip().splitlines()[-1]}"
        tail = self.stderr_tail(slot)
        if tail:
            cause += f"\n--- last lines of its output ---\n{tail}"
        if died_starting or now - slot.ready_at < STABLE_AFTER_S:
            slot.failed_starts += 1
        else:
            slot.failed_starts = 0
        if died_starting and slot.failed_starts >= MAX_FAILED_STARTS:
            slot.state = SlotState.FAILED
        else:
            slot.state = SlotState.DEAD
            slot.restarts += 1
            backoff = RESTART_BACKOFF_S[min(slot.failed_starts, len(RESTART_BACKOFF_S) - 1)]
            slot.restart_at = now + backoff
        return cause

    def stderr_tail(self, slot: Slot, lines: int = 20) -> str:
        if not slot.log_path:
            return ""
        try:
            with open(slot.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self, timeout: float) -> None:
        """Wait up to ``timeout`` for workers told to SHUTDOWN, then kill what is left; join everything."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            self.kill(slot, "the pool closed")
            slot.process.join(timeout=2.0)
            slot.process.close_sentinel()
            slot.state = SlotState.STOPPED


class WorkerProcess:
    """A worker's OS process: its Popen, and a pidfd that becomes readable when it exits."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.sentinel = os.pidfd_open(popen.pid)

    @classmethod
    def launch(cls, spec: WorkerSpec, log_path: str | None) -> "WorkerProcess":
        out = open(log_path, "ab") if log_path else None
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_ROOT], stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True,          # its own group: killpg reaches engine subprocesses
                close_fds=True)
        finally:
            if out:
                out.close()
        popen.stdin.write(spec.to_json().encode())
        popen.stdin.close()
        return cls(popen)

    @property
    def exitcode(self) -> int | None:
        """As multiprocessing reports it: negative for a signal."""
        return self.popen.poll()

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def close_sentinel(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


# The child reads its WorkerSpec from stdin; it imports mpdp from where the parent did.
_BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); from mpdp.worker import main; main()"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _killpg(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)     # the worker made itself leader of group == its pid
    except (ProcessLookupError, PermissionError):
        pass
