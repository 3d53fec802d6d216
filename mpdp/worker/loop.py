"""The worker process: one engine, one DEALER socket, one loop that drives it (and a beat thread).

    dispatcher ──SUBMIT/ABORT/SHUTDOWN──▶ DEALER ─▶ engine.add / engine.abort
    dispatcher ◀──RESULTS/STEPS─────────── DEALER ◀─ engine.step() (finished, and partials that stream)
    dispatcher ◀─HEARTBEAT / PING─▶ beat DEALER (worker/beat.py: its own thread)

The engine is driven by this one loop: new micro-batches are read between steps, so they
join the running batch while the engine generates. Heartbeats leave from a thread of their
own (``worker/beat.py``), so a long step never silences a live worker; they say which engine
call is running and for how long, which is how the dispatcher tells a hung engine (one call
past the engine's ``step_timeout``) from a slow one, and a frozen or dead process (no
heartbeat at all) from both.

A worker never outlives its pool and never leaves GPU memory held: it runs in its own
process group (the launcher kills the whole group, engine subprocesses included); a local
worker's watch thread kills that group when the parent process dies; and every worker exits
when the dispatcher has been silent for ``dispatcher_timeout`` (the dispatcher PINGs each
worker's beat thread every heartbeat interval), which is what frees a remote worker whose
driver is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

from mpdp.wire import protocol
from mpdp.wire.protocol import Tag
from mpdp.worker.beat import Beat, Progress
from mpdp.worker.spec import WorkerSpec


def main() -> None:
    """Entry point of a local worker process: the spec arrives on stdin."""
    worker_main(WorkerSpec.from_json(sys.stdin.read()))


def worker_main(spec: WorkerSpec) -> None:
    _place(spec)                       # before anything can initialise CUDA
    if spec.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(spec.parent_pid, spec.cleanup_paths), daemon=True,
                         name="mpdp-parent-watch").start()

    import zmq
    from mpdp.engines import engine_class
    from mpdp.engines.base import WorkerPlacement
    from mpdp.wire.transport import connect_dealer

    ctx = zmq.Context()
    sock = connect_dealer(ctx, spec.endpoint, spec.identity, spec.curve)
    placement = WorkerPlacement(spec.index, list(spec.gpus or []), spec.num_threads)
    try:
        engine = engine_class(spec.engine)(spec.model, spec.engine_options, placement)
    except BaseException:
        _die(sock, "engine failed to start:\n" + traceback.format_exc(), code=2)
    progress = Progress()
    beat = Beat(ctx, spec, progress)
    beat.start()
    ready = protocol.Ready(
        index=spec.index, pid=os.getpid(), capacity=engine.capacity, engine=spec.engine,
        max_model_len=engine.max_model_len, gpus=spec.gpus,
        kv_cache_tokens=getattr(engine, "kv_cache_tokens", None), node=os.uname().nodename,
        extra=getattr(engine, "ready_extra", None) or {}, step_timeout=engine.step_timeout)
    sock.send_multipart(protocol.encode(Tag.READY, ready.to_wire()))
    try:
        _serve(sock, engine, progress, spec.heartbeat_interval)
    except BaseException:
        _die(sock, "engine loop failed:\n" + traceback.format_exc(), code=1)
    beat.stop()
    engine.close()
    sock.close(linger=1000)            # let the last frames leave
    ctx.term()


def _serve(sock, engine, progress: Progress, heartbeat_interval: float) -> None:
    import zmq
    from mpdp.engines.base import EngineResult
    from mpdp.worker.step_meter import StepMeter

    meter = StepMeter(engine)           # step measurements for the dispatcher's batch limit
    poll_ms = int(heartbeat_interval * 1000)
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
                    if tag == Tag.SUBMIT:
                        with progress.running("add"):
                            _add_all(engine, protocol.submit_items(body), out)
                    elif tag == Tag.ABORT:
                        with progress.running("abort"):
                            engine.abort(protocol.abort_ids(body))
                    elif tag == Tag.SHUTDOWN:
                        return
                except protocol.ProtocolError as exc:
                    print(f"mpdp worker: dropped a bad frame: {exc}", file=sys.stderr)
        if engine.has_unfinished():
            started = time.monotonic()
            with progress.running("step"):
                stepped = engine.step()
            out.extend(stepped)
            meter.stepped(started, sum(1 for r in stepped if r.finished))
        else:
            meter.idle()
        if out:
            _send_results(sock, out)
        meter.report(sock, time.monotonic())


def _add_all(engine, items: list, out: list) -> None:
    """Add a micro-batch. One item that cannot be read or is refused fails alone, never its batch."""
    from mpdp.engines.base import EngineResult

    for item in items:
        try:
            req = protocol.request_from_wire(item)
        except protocol.ProtocolError as exc:
            rid = item[0] if isinstance(item, list) and item and isinstance(item[0], int) else None
            print(f"mpdp worker: unreadable request {rid}: {exc}", file=sys.stderr)
            if rid is not None:
                out.append(EngineResult.failure(rid, ValueError(f"the worker could not read it: {exc}")))
            continue
        try:
            engine.add(req)
        except Exception as exc:
            # Whatever add raises is this request's failure, not the worker's: engines raise
            # classes of their own for bad input (vLLM >= 0.27's VLLMValidationError is no
            # ValueError), and a worker killed for one would hand it on to the next (crash retry).
            # Only a failing step() is the engine's (see _serve).
            out.append(EngineResult.failure(req.id, exc))


def _send_results(sock, results: list) -> None:
    """Results in as many frames as they need; one result too large for any frame fails alone."""
    from mpdp.engines.base import EngineResult

    wire = [protocol.result_to_wire(r) for r in results]
    messages, too_big = protocol.encode_batches(Tag.RESULTS, wire)
    for pos in too_big:
        r = results[pos]
        size = sum(len(t) for t in r.texts)
        failure = EngineResult.failure(r.id, ValueError(
            f"its result ({size} characters of text) does not fit one frame of "
            f"{protocol.MAX_FRAME_BYTES} bytes (mpdp.wire.protocol.MAX_FRAME_BYTES); ask for fewer "
            f"choices (n) or fewer tokens (max_tokens)"))
        messages.append(protocol.encode(Tag.RESULTS, [protocol.result_to_wire(failure)]))
    for frames in messages:
        sock.send_multipart(frames)


def _die(sock, error: str, code: int) -> None:
    """Tell the dispatcher why (like vLLM's ENGINE_CORE_DEAD), then exit without cleanup."""
    print(error, file=sys.stderr, flush=True)
    try:
        sock.send_multipart(protocol.encode(Tag.DEAD, {"error": error[-8000:]}))
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


def _watch_parent(parent_pid: int, cleanup_paths: list[str]) -> None:
    """When the pool's process dies (even by SIGKILL or an unhandled SIGTERM, which run no
    cleanup there), remove the pool's folders and take this worker's whole group down."""
    import shutil

    while os.getppid() == parent_pid:
        time.sleep(0.25)
    for path in cleanup_paths:
        shutil.rmtree(path, ignore_errors=True)
    os.killpg(os.getpgid(0), signal.SIGKILL)
