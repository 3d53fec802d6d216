"""A worker's beat thread: its liveness, kept apart from its engine's progress.

    main thread (worker/loop.py)                beat thread (its own DEALER: identity + BEAT_SUFFIX)
    ────────────────────────────                ───────────────────────────────────────────────────
    with progress.running("step"):              every heartbeat_interval:
        engine.step()          ── Progress ──▶      HEARTBEAT {steps, call, busy_s}  ──▶ dispatcher
                                (plain fields,  PING from the dispatcher ──▶ last heard; silent for
                                 no lock)           dispatcher_timeout: the worker's group exits

Why a thread: a worker that beat only between engine steps went silent for as long as one step
took, so on a busy machine (a first JSON request compiling its grammar, a prefill chunk on
cores that other processes take) a healthy worker was killed as hung. This thread beats while
the engine computes: torch releases the GIL in its kernels, and Python code hands it over every
``sys.getswitchinterval()`` (5 ms); with the hf engine on a 2-core machine at load 19, beats were
late by at most 0.3 s through engine calls of up to 21 s (bench/liveness.py). What still
silences the beats is what should: a frozen process (SIGSTOP, swapped out) or a dead one, and
a native call that keeps the GIL past ``heartbeat_timeout``. An engine call that never returns
is caught by the dispatcher from ``busy_s``, held against the engine's ``step_timeout``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mpdp.wire import protocol
from mpdp.wire.protocol import BEAT_SUFFIX, Tag


class Progress:
    """What the engine is doing, written by the main thread and read by the beat thread.

    Each field is one attribute store (atomic under the GIL); ``since`` is stored before
    ``call``, and read after it, so a reader never pairs a new call with an old start time.
    ``steps`` counts the steps begun: during a step it is that step's number.
    """

    __slots__ = ("steps", "call", "since")

    def __init__(self) -> None:
        self.steps = 0
        self.call: str | None = None
        self.since = 0.0

    def running(self, call: str) -> "Progress":
        """``with progress.running("step"): engine.step()`` (a plain object, not a generator:
        this runs around every step)."""
        self.since = time.monotonic()
        if call == "step":
            self.steps += 1
        self.call = call
        return self

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.call = None

    def heartbeat(self) -> protocol.Heartbeat:
        call = self.call
        busy = max(0.0, time.monotonic() - self.since) if call is not None else 0.0
        return protocol.Heartbeat(self.steps, call, round(busy, 3))


class Beat:
    """The beat thread and its socket (made, used and closed in that thread only)."""

    def __init__(self, ctx, spec, progress: Progress):
        self._ctx = ctx
        self._spec = spec
        self._progress = progress
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="mpdp-beat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(5.0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        import zmq
        from mpdp.wire.transport import connect_dealer

        spec = self._spec
        sock = connect_dealer(self._ctx, spec.endpoint, spec.identity + BEAT_SUFFIX, spec.curve)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_heard = next_beat = time.monotonic()
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= next_beat:
                    sock.send_multipart(protocol.encode(Tag.HEARTBEAT, self._progress.heartbeat().to_wire()))
                    next_beat = now + spec.heartbeat_interval
                events = dict(poller.poll(max(0, int((next_beat - time.monotonic()) * 1000))))
                if sock in events:
                    last_heard = time.monotonic()
                    _drain(sock)
                silent = time.monotonic() - last_heard
                if silent > spec.dispatcher_timeout:
                    # What frees a remote worker whose driver is gone (a local one also watches its parent).
                    print(f"mpdp worker {spec.index}: no word from the dispatcher for {silent:.0f}s "
                          f"(dispatcher_timeout={spec.dispatcher_timeout:g}); exiting", file=sys.stderr, flush=True)
                    os.killpg(os.getpgid(0), signal.SIGKILL)
        finally:
            sock.close(linger=0)


def _drain(sock) -> None:
    """Read what arrived: PINGs, whose arrival is all that counts."""
    import zmq

    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            tag, _ = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            print(f"mpdp worker: dropped a bad frame on the beat socket: {exc}", file=sys.stderr)
            continue
        if tag != Tag.PING:
            print(f"mpdp worker: unexpected {tag.name} on the beat socket", file=sys.stderr)
