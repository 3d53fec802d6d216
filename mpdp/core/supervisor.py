"""Slots and their lifecycle: when a worker starts, dies and restarts. Called only from the dispatcher thread.

Each worker lives in a slot that outlives its processes: a slot is placed once (its GPUs,
its share of the CPU) and then goes through incarnations, each a new worker from the
launcher (``mpdp/launch``) with a new identity. The lifecycle of a slot is an explicit state:

    DEAD ──start──▶ STARTING ──READY──▶ READY ──death / silence──▶ DEAD ──backoff──▶ STARTING ...
                        └── too many failed starts ──▶ FAILED       (and STOPPED once the pool closes)

A start that cannot even spawn (out of file descriptors, a launcher error) is a failed start
of that slot like a death before READY: it backs off and tries again while the others serve.
Slots that share a GPU start one after another, so that engines profiling free memory at the
same moment do not split it between them lopsidedly.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from mpdp.errors import describe_exit
from mpdp.launch.base import Launcher, WorkerHandle
from mpdp.wire.protocol import BEAT_SUFFIX
from mpdp.worker.spec import WorkerSpec

log = logging.getLogger("mpdp")

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
    handle: WorkerHandle | None = None
    identity: bytes = b""
    beat_identity: bytes = b""      # its beat thread's socket (HEARTBEAT out, PING in)
    incarnation: int = -1
    started_at: float = 0.0
    ready_at: float = 0.0
    last_seen: float = 0.0
    last_ping: float = 0.0
    restart_at: float = 0.0
    failed_starts: int = 0
    restarts: int = 0
    capacity: int = 0
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    node: str | None = None
    # Its engine's progress, from the last HEARTBEAT: steps begun, the call in progress (None:
    # idle) and since when on this clock; and how long one call may run (from READY or the pool).
    steps: int = 0
    call: str | None = None
    call_since: float = 0.0
    step_timeout: float = 0.0
    last_error: str = ""            # from the worker's DEAD message, or why it was killed
    exit_reason: str = ""
    # what it served, over all incarnations
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None   # of prompt_tokens, those its prefix cache held (engines that say: vLLM)
    first_dispatch: float | None = None
    last_result: float | None = None

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    @property
    def alive(self) -> bool:
        return self.state in (SlotState.STARTING, SlotState.READY)


@dataclass(slots=True)
class LaunchConfig:
    engine: str
    model: str
    engine_options: dict
    heartbeat_interval: float
    dispatcher_timeout: float
    env: dict


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


class Supervisor:
    def __init__(self, slots: list[Slot], launch: LaunchConfig, launcher: Launcher, endpoint: str, curve=None,
                 cleanup_paths: list[str] | None = None):
        self.slots = slots
        self.launch = launch
        self.launcher = launcher
        self.endpoint = endpoint
        self.curve = curve
        self.token = secrets.token_hex(8)
        # The pool's private folders (logs, the ipc socket's): local workers remove them if
        # the pool's process dies without cleaning up (SIGKILL, an unhandled SIGTERM).
        self.cleanup_paths = [*launcher.cleanup_paths, *(cleanup_paths or [])]

    def may_start(self, slot: Slot) -> bool:
        """False while another slot on one of its GPUs is still loading (see the module docstring)."""
        if not slot.gpus:
            return True
        mine = set(slot.gpus)
        return not any(s is not slot and s.state == SlotState.STARTING and mine & set(s.gpus or ())
                       for s in self.slots)

    def start(self, slot: Slot, now: float) -> bool:
        """Start a new incarnation. False (and a backoff) if the launcher could not start one."""
        slot.incarnation += 1
        spec = WorkerSpec(
            index=slot.index, incarnation=slot.incarnation, endpoint=self.endpoint,
            engine=self.launch.engine, model=self.launch.model,
            engine_options=self.launch.engine_options, gpus=slot.gpus, num_threads=slot.num_threads,
            heartbeat_interval=self.launch.heartbeat_interval,
            dispatcher_timeout=self.launch.dispatcher_timeout, parent_pid=os.getpid(),
            curve=self.curve, env=self.launch.env, token=self.token,
            cleanup_paths=self.cleanup_paths)
        slot.identity = spec.identity
        slot.beat_identity = spec.identity + BEAT_SUFFIX
        slot.steps, slot.call = 0, None
        slot.last_error = slot.exit_reason = ""
        try:
            slot.handle = self.launcher.launch(spec, f"worker{slot.index}.{slot.incarnation}.log")
        except OSError as exc:
            slot.handle = None
            slot.last_error = f"could not start: {exc!r}"
            log.warning("mpdp: worker %d %s", slot.index, slot.last_error)
            self._plan_restart(slot, now, died_starting=True)
            return False
        slot.node = slot.handle.node
        slot.state = SlotState.STARTING
        slot.started_at = slot.last_seen = slot.last_ping = now
        return True

    def kill(self, slot: Slot, reason: str) -> None:
        """End the worker and its whole process group (its engine's own subprocesses too)."""
        if not slot.exit_reason:
            slot.exit_reason = reason
        if slot.handle is not None:
            slot.handle.kill()

    def reap(self, slot: Slot, now: float) -> str:
        """After the worker ended: clean up, note why it died, plan the restart. Returns the cause."""
        handle = slot.handle
        handle.reap(timeout=1.0)
        died_starting = slot.state == SlotState.STARTING
        cause = f"worker {slot.index} (pid {handle.pid}) died with {describe_exit(handle.exitcode)}"
        if slot.exit_reason:
            cause += f" after {slot.exit_reason}"
        if slot.last_error:
            cause += f"; it reported: {slot.last_error.strip().splitlines()[-1]}"
        tail = handle.log_tail()
        if tail:
            cause += f"\n--- last lines of its output ---\n{tail}"
        self._plan_restart(slot, now, died_starting)
        return cause

    def _plan_restart(self, slot: Slot, now: float, died_starting: bool) -> None:
        if died_starting or now - slot.ready_at < STABLE_AFTER_S:
            slot.failed_starts += 1
        else:
            slot.failed_starts = 0
        if died_starting and slot.failed_starts >= MAX_FAILED_STARTS:
            slot.state = SlotState.FAILED
        else:
            slot.state = SlotState.DEAD
            slot.restarts += 1
            slot.restart_at = now + RESTART_BACKOFF_S[min(slot.failed_starts, len(RESTART_BACKOFF_S) - 1)]

    def stderr_tail(self, slot: Slot) -> str:
        return slot.handle.log_tail() if slot.handle is not None else ""

    def stop_all(self, timeout: float) -> None:
        """Wait up to ``timeout`` for workers told to SHUTDOWN, then kill what is left; reap everything."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.handle is None:
                continue
            slot.handle.join(max(0.0, deadline - time.monotonic()))
            self.kill(slot, "the pool closed")
            slot.handle.reap(timeout=2.0)
            slot.state = SlotState.STOPPED
        self.launcher.close()


def describe(slot: Slot) -> dict[str, Any]:
    """A slot's public facts, for stats()."""
    return {"index": slot.index, "pid": slot.pid, "alive": slot.alive, "state": slot.state.value,
            "gpus": slot.gpus, "node": slot.node, "capacity": slot.capacity,
            "requests": slot.requests, "tokens": slot.tokens, "prompt_tokens": slot.prompt_tokens,
            "cached_tokens": slot.cached_tokens,
            "prefix_hit_rate": (round(slot.cached_tokens / slot.prompt_tokens, 4)
                                if slot.cached_tokens is not None and slot.prompt_tokens else None),
            "restarts": slot.restarts, "max_model_len": slot.max_model_len,
            "kv_cache_tokens": slot.kv_cache_tokens, "steps": slot.steps, "step_timeout": slot.step_timeout,
            "first_dispatch": slot.first_dispatch, "last_result": slot.last_result}
