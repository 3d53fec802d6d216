"""The worker process: one engine, one DEALER socket, one loop.

    dispatcher ──SUBMIT/ABORT/SHUTDOWN──▶ DEALER ─▶ engine.add / engine.abort
    dispatcher ◀──RESULTS/HEARTBEAT────── DEALER ◀─ engine.step() (finished requests only)

The loop is single-threaded on purpose (as in the ZeroMQ guide's Paranoid Pirate worker):
a heartbeat leaves only between engine steps, so a hung engine goes silent and the
dispatcher's heartbeat expiry catches it, just like a dead process. New micro-batches are
read between steps, so they join the running batch while the engine generates.

Two guards make sure a worker never outlives its pool and never leaves GPU memory held:
the worker runs in its own session and process group (the supervisor kills the whole
group, engine subprocesses included), and a watch thread kills that group when the parent process dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from mpdp import protocol
from mpdp.transport import CurveKeys


@dataclass(slots=True)
class WorkerSpec:
    """Everything a worker needs, as plain data (it crosses the spawn boundary)."""

    index: int
    incarnation: int
    endpoint: str
    engine: str
    model: str
    engine_options: dict[str, Any]
    gpus: list[int] | None            # physical GPU ids; None = leave CUDA_VISIBLE_DEVICES alone
    num_threads: int
    heartbeat_interval: float
    parent_pid: int
    curve: CurveKeys | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> bytes:
        # A new identity per incarnation: late frames from a dead incarnation are recognisably stale.
        return f"w{self.index}.{self.incarnation}".encode()

    def to_json(self) -> str:
        d = {f: getattr(self, f) for f in self.__slots__}
        d["curve"] = {k: v.decode() for k, v in asdict(self.curve).items()} if self.curve else None
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        d["curve"] = CurveKeys(**{k: v.encode() for k, v in d["curve"].items()}) if d["curve"] else None
        return cls(**d)


def main() -> None:
    """Entry point of the worker process: the spec arrives on stdin."""
    worker_main(WorkerSpec.from_json(sys.stdin.read()))


def worker_main(spec: WorkerSpec) -> None:
    _place(spec)                       # before anything can initialise CUDA
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True,
                     name="mpdp-parent-watch").start()

    import zmq
    from mpdp.engines import engine_class
    from mpdp.engines.base import WorkerPlacement
    from mpdp.transport import connect_dealer

    ctx = zmq.Context()
    sock = connect_dealer(ctx, spec.endpoint, spec.identity, spec.curve)
    placement = WorkerPlacement(spec.index, list(spec.gpus or []), spec.num_threads)
    try:
        engine = engine_class(spec.engine)(spec.model, spec.engine_options, placement)
    except BaseException:
        _die(sock, "engine failed to start:\n" + traceback.format_exc(), code=2)
    sock.send_multipart(protocol.encode(protocol.READY, {
        "index": spec.index, "pid": os.getpid(), "capacity": engine.capacity,
        "max_model_len": engine.max_model_len, "engine": spec.engine, "gpus": spec.gpus}))
    try:
        _serve(sock, engine, spec.heartbeat_interval)
    except BaseException:
        _die(sock, "engine loop failed:\n" + traceback.format_exc(), code=1)
    engine.close()
    sock.close(linger=1000)            # let the last frames leave
    ctx.term()


def _serve(sock, engine, heartbeat_interval: float) -> None:
    import zmq
    from mpdp.engines.base import EngineResult

    poll_ms = int(heartbeat_interval * 1000)
    next_beat = time.monotonic() + heartbeat_interval
    steps = 0
    while True:
        out: list[EngineResult] = []
        if sock.poll(0 if engine.has_unfinished() else poll_ms):
            while True:                # drain everything that has arrived
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    tag, body = protocol.decode(frames)
                except protocol.ProtocolError as exc:
                    print(f"mpdp worker: dropped a bad frame: {exc}", file=sys.stderr)
                    continue
                if tag == protocol.SUBMIT:
                    for item in body:
                        req = protocol.request_from_wire(item)
                        try:
                            engine.add(req)
                        except (ValueError, TypeError) as exc:   # a bad request fails alone
                            out.append(EngineResult.failure(req.id, exc))
                elif tag == protocol.ABORT:
                    engine.abort(body)
                elif tag == protocol.SHUTDOWN:
                    return
        if engine.has_unfinished():
            out.extend(engine.step())
            steps += 1
        if out:
            sock.send_multipart(protocol.encode(protocol.RESULTS, [protocol.result_to_wire(r) for r in out]))
        now = time.monotonic()
        if now >= next_beat:
            sock.send_multipart(protocol.encode(protocol.HEARTBEAT, {"steps": steps}))
            next_beat = now + heartbeat_interval


def _die(sock, error: str, code: int) -> None:
    """Tell the dispatcher why (like vLLM's ENGINE_CORE_DEAD), then exit without cleanup."""
    print(error, file=sys.stderr, flush=True)
    try:
        sock.send_multipart(protocol.encode(protocol.DEAD, {"error": error[-8000:]}))
        sock.close(linger=1000)
    finally:
        sys.stderr.flush()
        os._exit(code)


def _place(spec: WorkerSpec) -> None:
    if spec.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
    # A share of the cores, so that N CPU workers do not oversubscribe the machine.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(spec.num_threads)
    os.environ.update(spec.env)


def _watch_parent(parent_pid: int) -> None:
    """When the pool's process dies (even by SIGKILL), take this worker's whole group down."""
    while os.getppid() == parent_pid:
        time.sleep(0.25)
    os.killpg(os.getpgid(0), signal.SIGKILL)
