"""A slow worker is not a hung worker: liveness (heartbeats from a thread of the worker's own)
and progress (how long the engine's current call has run) are judged apart.

- a step that computes for several heartbeat timeouts (holding the GIL as Python code does)
  is served, and its worker is not restarted;
- a step that never returns is caught by ``step_timeout``, a frozen (SIGSTOPped) worker by
  ``heartbeat_timeout``: both within bounded waits, both naming their cause;
- on the wire: heartbeats keep coming during a long step and say which call runs and for how
  long; a worker whose dispatcher goes silent still exits by itself.

Every wait is an outcome with a generous bound, never a timing margin: the suite runs on
loaded 2-core machines.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

import mpdp
from conftest import wait_until
from mpdp.wire import protocol
from mpdp.wire.protocol import BEAT_SUFFIX, Tag

pytestmark = [pytest.mark.usefixtures("no_child_left"), pytest.mark.timeout(120)]

# Heartbeats every 0.1 s and a short heartbeat_timeout: a step of SLOW_S seconds is several
# heartbeat timeouts long, so a worker that beat only between steps would be killed twice.
LIVENESS = dict(heartbeat_interval=0.1, heartbeat_timeout=2.0, shutdown_timeout=5.0)
SLOW_S = 6.0


def workers(pool) -> list[dict]:
    return pool.stats()["workers"]


def test_a_slow_step_is_served_and_its_worker_kept():
    with mpdp.Pool(engine="echo", num_workers=1, max_crashes=2, engine_options={"faults": True},
                   **LIVENESS) as pool:
        slow = pool.submit(f"!fault:slow:{SLOW_S:g}")
        # While it computes, the worker is seen busy in that step (its heartbeats say so).
        seen = wait_until(lambda: [w for w in workers(pool) if w["engine_call"] == "step" and w["busy_s"] > 1.0],
                          60, what="a heartbeat reporting the long step")
        assert seen[0]["state"] == "ready"
        assert slow.result(timeout=90).text == f"!fault:slow:{SLOW_S:g}"[:16]
        assert [w["restarts"] for w in workers(pool)] == [0]
        assert pool.submit("after").result(timeout=30).text == "after"


def test_a_step_that_never_returns_is_caught_by_the_step_timeout():
    # max_crashes=1: the first hang fails the request, with the reason the worker was killed.
    with mpdp.Pool(engine="echo", num_workers=1, max_crashes=1, step_timeout=3.0,
                   engine_options={"faults": True}, **LIVENESS) as pool:
        assert workers(pool)[0]["step_timeout"] == 3.0
        started = time.monotonic()
        with pytest.raises(mpdp.WorkerCrashed, match=r"engine's step \(step \d+\) ran for \d+s without "
                                                     r"returning: a hung engine \(step_timeout=3"):
            pool.submit("!fault:hang").result(timeout=90)
        assert time.monotonic() - started >= 3.0           # not before its budget ran out
        wait_until(lambda: workers(pool)[0]["state"] == "ready", 60, what="the worker restarted")
        assert pool.submit("after").result(timeout=30).text == "after"


def test_each_engine_brings_its_step_timeout_unless_the_pool_sets_one():
    with mpdp.Pool(engine="echo", num_workers=1, **LIVENESS) as pool:
        assert workers(pool)[0]["step_timeout"] == mpdp.engines.echo.EchoEngine.step_timeout


def test_a_frozen_worker_is_caught_by_the_heartbeat_timeout():
    with mpdp.Pool(engine="echo", num_workers=1, max_crashes=1, engine_options={"delay_s": 60},
                   **LIVENESS) as pool:
        held = pool.submit("held")
        wait_until(lambda: workers(pool)[0]["in_flight"] == 1, 30, what="the request in flight")
        pid = workers(pool)[0]["pid"]
        os.kill(pid, signal.SIGSTOP)          # every thread stops, the beat thread too
        try:
            with pytest.raises(mpdp.WorkerCrashed, match=r"no heartbeat for [\d.]+s: its process is frozen or "
                                                         r"gone \(heartbeat_timeout=2\)"):
                held.result(timeout=60)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_until(lambda: workers(pool)[0]["state"] == "ready" and workers(pool)[0]["pid"] != pid, 60,
                   what="a new worker")


def test_a_dispatcher_that_could_not_run_does_not_take_its_own_pause_for_silent_workers():
    # The dispatcher is a thread of the caller's process: a full GC of a large heap there (5 s
    # measured at load 9 on 2 cores) or any native call that holds the GIL stops it. Heartbeats
    # sent meanwhile wait in its socket; they must count. Here the GIL is held for 4 s at a time
    # (a C sleep through ctypes.PyDLL, which keeps it) with heartbeat_timeout=3.5: each hold is
    # longer than the timeout, and the 2.5 s between the timeout and the beat interval leave room
    # for a beat thread that a busy machine runs late.
    hold_gil = ctypes.PyDLL(None).sleep
    with mpdp.Pool(engine="echo", num_workers=2, heartbeat_interval=1.0, heartbeat_timeout=3.5,
                   shutdown_timeout=5.0) as pool:
        assert pool.submit("before").result(timeout=30).text == "before"
        for _ in range(3):
            hold_gil(5)
            time.sleep(1.5)                   # the dispatcher runs rounds again
        assert [w["restarts"] for w in workers(pool)] == [0, 0]
        assert pool.submit("after").result(timeout=30).text == "after"


@pytest.mark.parametrize("body", [[], {"steps": "1"}, {"steps": 1, "call": "nap"}, {"busy_s": -1},
                                  {"busy_s": True}, {"busy_s": float("nan")}])
def test_a_bad_heartbeat_is_a_protocol_error(body):
    with pytest.raises(protocol.ProtocolError, match="HEARTBEAT"):
        protocol.Heartbeat.from_wire(body)


def test_heartbeats_round_trip_and_ready_checks_the_step_timeout():
    beat = protocol.Heartbeat(7, "step", 1.5)
    assert protocol.Heartbeat.from_wire(beat.to_wire()) == beat
    assert protocol.Heartbeat.from_wire({"steps": 3}) == protocol.Heartbeat(3, None, 0.0)
    ready = {"index": 0, "pid": 1, "capacity": 1, "engine": "echo"}
    assert protocol.Ready.from_wire({**ready, "step_timeout": 2.5}).step_timeout == 2.5
    for bad in (0, -1, "10", True):
        with pytest.raises(protocol.ProtocolError, match="step_timeout"):
            protocol.Ready.from_wire({**ready, "step_timeout": bad})


@pytest.mark.parametrize("value", [0, -1.0, float("inf")])
def test_step_timeout_is_checked(value):
    with pytest.raises(ValueError, match="step_timeout"):
        mpdp.PoolConfig(engine="echo", step_timeout=value)


# -- on the wire: a real worker process against a ROUTER of this test's own ----------------------
def _spawn_worker(endpoint: str, dispatcher_timeout: float) -> tuple[subprocess.Popen, bytes]:
    from mpdp.worker.spec import WorkerSpec

    spec = WorkerSpec(index=0, incarnation=0, endpoint=endpoint, engine="echo", model="echo",
                      engine_options={"faults": True}, gpus=None, num_threads=1, heartbeat_interval=0.1,
                      dispatcher_timeout=dispatcher_timeout, parent_pid=None, token="t")
    # A session of its own: a worker that gives up kills its whole process group.
    proc = subprocess.Popen([sys.executable, "-c", "from mpdp.worker.loop import main; main()"],
                            stdin=subprocess.PIPE, start_new_session=True)
    proc.stdin.write(spec.to_json().encode())
    proc.stdin.close()
    return proc, spec.identity


@pytest.fixture
def router(tmp_path):
    """A ROUTER of this test's own, standing in for the dispatcher: (socket, endpoint)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/router"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(linger=0)
    ctx.term()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def _recv(router, timeout: float):
    if not router.poll(int(timeout * 1000)):
        return None
    identity, *frames = router.recv_multipart()
    tag, body = protocol.decode(frames)
    return identity, tag, body


def test_heartbeats_say_which_call_runs_and_for_how_long(router):
    router, endpoint = router
    proc, identity = _spawn_worker(endpoint, dispatcher_timeout=60.0)
    try:
        beats, results, ready = [], [], None
        deadline = time.monotonic() + 90
        while not results and time.monotonic() < deadline:
            got = _recv(router, 1.0)
            if got is None:
                continue
            who, tag, body = got
            if who == identity + BEAT_SUFFIX:
                assert tag == Tag.HEARTBEAT
                beats.append(protocol.Heartbeat.from_wire(body))
                router.send_multipart([who, *protocol.encode(Tag.PING, {})])
            elif tag == Tag.READY:
                ready = protocol.Ready.from_wire(body)
                request = protocol.request_to_wire(mpdp.engines.base.EngineRequest(1, prompt="!fault:slow:3"))
                router.send_multipart([identity, *protocol.encode(Tag.SUBMIT, [request])])
            elif tag == Tag.RESULTS:
                results = list(protocol.results_from_wire(body))
        assert ready is not None and ready.step_timeout == 30.0
        assert [r.texts for r in results] == [["!fault:slow:3"]]
        during = [b for b in beats if b.call == "step"]
        # Beats kept coming during the 3-s step, each saying how long it had run so far.
        assert len(during) >= 5 and max(b.busy_s for b in during) >= 1.5
        assert len({b.steps for b in during if b.busy_s >= 1.0}) == 1
    finally:
        _stop(proc)


def test_a_worker_whose_dispatcher_goes_silent_exits_by_itself_even_inside_a_hung_step(router):
    router, endpoint = router
    proc, identity = _spawn_worker(endpoint, dispatcher_timeout=2.0)
    try:
        while (got := _recv(router, 60.0)) is not None and got[1] != Tag.READY:
            pass
        assert got is not None, "no READY"
        request = protocol.request_to_wire(mpdp.engines.base.EngineRequest(1, prompt="!fault:hang"))
        router.send_multipart([identity, *protocol.encode(Tag.SUBMIT, [request])])
        # No PING ever: its beat thread gives up after dispatcher_timeout, while the engine hangs.
        assert proc.wait(90) == -signal.SIGKILL
    finally:
        _stop(proc)
