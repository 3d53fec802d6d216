"""The reliability pass: callbacks, big frames, recovery edges, fork, arguments, the TCP wire.
Each case failed on the earlier core; every wait is bounded, nothing is timed."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import zmq

import mpdp
from conftest import FAST, full_size, wait_until
from mpdp.wire import protocol
from mpdp.wire.transport import CurveKeys, connect_dealer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("no_child_left")


def restarts(pool) -> int:
    return sum(w["restarts"] for w in pool.stats()["workers"])


# ─── Callbacks ───────────────────────────────────────────────────────────────

@pytest.mark.timeout(60)
def test_a_done_callback_may_call_the_pool_even_when_it_is_full(make_pool):
    pool = make_pool(max_pending=4, engine_options={"delay_s": 0.05})
    inner = []
    done = threading.Event()

    def again(_):
        inner.append(pool.submit("from a callback").result(timeout=20).text)
        inner.extend(c.text for c in pool.generate(["g1", "g2"]))
        done.set()

    futures = [pool.submit(f"f{i}") for i in range(4)]          # the pool is full
    futures[0].add_done_callback(again)
    assert [f.result(timeout=20).text for f in futures] == [f"f{i}" for i in range(4)]
    assert done.wait(20)
    assert inner == ["from a callback", "g1", "g2"]
    pool.close(timeout=10)
    assert pool.closed


@pytest.mark.timeout(60)
def test_a_blocking_callback_neither_stalls_the_pool_nor_kills_workers(make_pool):
    pool = make_pool(heartbeat_timeout=2.0)                      # 20 heartbeats' worth of silence
    release = threading.Event()
    first = pool.submit("slow callback")
    first.add_done_callback(lambda _: release.wait(8))           # 4x the heartbeat timeout
    first.result(timeout=10)
    assert [pool.submit(f"x{i}").result(timeout=10).text for i in range(20)] == [f"x{i}" for i in range(20)]
    time.sleep(3.0)                                              # past the heartbeat timeout
    release.set()
    assert restarts(pool) == 0


# ─── Sizes ───────────────────────────────────────────────────────────────────

@pytest.mark.timeout(120)
def test_results_larger_than_a_frame_are_split_and_one_too_big_fails_alone(make_pool):
    pool = make_pool(num_workers=1, engine_options={"delay_s": 0.5})
    big = "x" * 2**20
    futures = [pool.submit(str(i) + big, max_tokens=2**20) for i in range(40)]   # 40 MiB in one step
    huge = pool.submit("y" * (2**20), n=80, max_tokens=2**20)                        # 80 MiB alone
    assert [f.result(timeout=60).text[:2] for f in futures] == [str(i)[:2] if i > 9 else f"{i}x" for i in range(40)]
    with pytest.raises(ValueError, match="MAX_FRAME_BYTES"):
        huge.result(timeout=60)
    assert pool.stats()["dropped_frames"] == 0 and restarts(pool) == 0


@pytest.mark.timeout(120)
def test_a_micro_batch_larger_than_a_frame_is_split(make_pool):
    pool = make_pool(num_workers=1, max_crashes=1)
    prompts = [f"{i:04d}" + "p" * 140_000 for i in range(512)]   # ~72 MB as one micro-batch
    out = pool.generate(prompts, max_tokens=4)
    assert [c.text for c in out] == [p[:4] for p in prompts]
    assert restarts(pool) == 0


def test_a_request_the_worker_could_not_decode_is_refused_at_submit(make_pool):
    pool = make_pool()
    good = [pool.submit(f"g{i}") for i in range(100)]
    with pytest.raises(TypeError, match="keys must be strings"):
        pool.submit("bad", chat_template_kwargs={(1, 2): 3})
    assert [f.result(timeout=10).text for f in good] == [f"g{i}" for i in range(100)]


# ─── Recovery edges ──────────────────────────────────────────────────────────

@pytest.mark.timeout(120)
def test_two_workers_killed_at_once_fail_nothing(make_pool):
    for _ in range(3):
        pool = make_pool(engine_options={"delay_s": 0.3})
        futures = [pool.submit(f"r{i}") for i in range(20)]
        wait_until(lambda: all(w["in_flight"] for w in pool.stats()["workers"]), 10, what="both busy")
        for w in pool.stats()["workers"]:
            os.kill(w["pid"], signal.SIGKILL)
        assert [f.result(timeout=30).text for f in futures] == [f"r{i}" for i in range(20)]
        pool.close(wait=False)


@pytest.mark.timeout(60)
def test_a_restart_that_cannot_spawn_backs_off_while_the_others_serve(make_pool):
    pool = make_pool(engine_options={"delay_s": 0.05})
    launcher = pool._dispatcher.supervisor.launcher
    real, failures = launcher.launch, []

    def flaky(spec, name):
        if len(failures) < 2:
            failures.append(name)
            raise OSError(24, "Too many open files")
        return real(spec, name)

    launcher.launch = flaky
    victim = pool.stats()["workers"][0]["pid"]
    futures = [pool.submit(f"r{i}") for i in range(20)]
    os.kill(victim, signal.SIGKILL)
    assert [f.result(timeout=30).text for f in futures] == [f"r{i}" for i in range(20)]
    assert not pool.closed
    wait_until(lambda: full_size(pool), 20, what="the slot back after two failed spawns")
    assert len(failures) == 2


@pytest.mark.timeout(60)
def test_close_never_signals_a_pid_the_pool_already_reaped(make_pool, monkeypatch):
    pool = make_pool(num_workers=1)
    slot = pool._dispatcher.slots[0]
    old = slot.handle
    os.kill(old.pid, signal.SIGKILL)
    wait_until(lambda: old._reaped, 10, what="the death to be reaped")
    signalled = []
    import mpdp.launch.local as local
    real = local.killpg
    monkeypatch.setattr(local, "killpg", lambda pid: (signalled.append(pid), real(pid)))
    old.kill()                                   # what close() does to every handle it ever had
    assert old.pid not in signalled


@pytest.mark.timeout(600)
def test_a_flood_of_submit_and_cancel_never_starves_heartbeats(make_pool):
    pool = make_pool(engine_options={"delay_s": 0.01})
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            for f in [pool.submit("c") for _ in range(200)]:
                f.cancel()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            # Each probe waits behind the flood's queued commands (~200,000 cancels at load 9 on
            # 2 cores, 20-30 s to drain): a generous bound on a loaded machine.
            assert pool.submit(f"probe{i}").result(timeout=150).text == f"probe{i}"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert restarts(pool) == 0


# ─── Life cycle and arguments ────────────────────────────────────────────────

_FORK = textwrap.dedent("""
    import os, sys, mpdp
    pool = mpdp.Pool(engine="echo", num_workers=1)
    pid = os.fork()
    if pid == 0:
        try:
            pool.submit("child")
            os._exit(3)
        except mpdp.PoolBroken as exc:
            os._exit(0 if "forked child" in str(exc) else 4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    pool._dispatcher.supervisor.slots[0].handle.kill()      # a crash: the parent restarts it
    print(pool.submit("parent still serves", timeout=30, max_tokens=100).result().text, flush=True)
    pool.close()
""")


@pytest.mark.timeout(60)
def test_a_pool_in_a_forked_child_raises_and_the_parent_keeps_serving(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True, env=env, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "parent still serves"
    assert not glob.glob(str(tmp_path / "mpdp-*"))


@pytest.mark.timeout(60)
def test_wait_ready_false_enforces_max_pending_and_close_drains(no_child_left):
    pool = mpdp.Pool(engine="echo", num_workers=2, wait_ready=False, max_pending=5, **FAST)
    futures = [pool.submit(f"early{i}") for i in range(5)]
    blocked = threading.Event()

    def sixth():                             # waits for room, then finds the pool draining
        try:
            futures.append(pool.submit("sixth"))
        except mpdp.PoolClosed:
            blocked.set()

    t = threading.Thread(target=sixth)
    t.start()
    pool.close(wait=True)                    # during start: drains, does not fail them
    t.join(10)
    assert [f.result(timeout=10).text for f in futures[:5]] == [f"early{i}" for i in range(5)]
    assert len(futures) == 5 or futures[5].result(timeout=10).text == "sixth"


@pytest.mark.parametrize("kwargs, name", [
    ({"heartbeat_interval": -1}, "heartbeat_interval"),
    ({"heartbeat_interval": 2.0, "heartbeat_timeout": 1.0}, "heartbeat_timeout"),
    ({"max_crashes": True}, "max_crashes"),
    ({"max_pending": 0}, "max_pending"),
    ({"num_workers": 1.5}, "num_workers"),
    ({"shutdown_timeout": float("nan")}, "shutdown_timeout"),
    ({"worker_logs": "stdout"}, "worker_logs"),
    ({"routing": "random"}, "routing"),
    ({"launcher": "slurm"}, "launcher"),
])
def test_every_pool_argument_is_validated(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        mpdp.Pool(engine="echo", num_workers=1, **kwargs)


def test_a_request_timeout_of_true_is_refused(make_pool):
    pool = make_pool()
    with pytest.raises(ValueError, match="timeout"):
        pool.submit("x", timeout=True)


@pytest.mark.parametrize("transport", [
    lambda port: mpdp.Transport("tcp", port=port),            # the port is taken
    lambda port: mpdp.Transport("ipc", folder="/tmp/" + "d" * 120),   # an ipc path over 107 bytes
])
def test_a_pool_that_fails_to_start_leaks_no_folder(tmp_path, monkeypatch, transport, no_child_left):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(OSError):
            mpdp.Pool(engine="echo", num_workers=1, transport=transport(port), **FAST)
    finally:
        taken.close(0)
    assert not glob.glob(str(tmp_path / "mpdp-*"))


@pytest.mark.timeout(60)
def test_finished_requests_leave_the_deadline_heap(make_pool):
    pool = make_pool()
    for _ in range(6):
        pool.generate([f"t{i}" for i in range(4000)], timeout=600)
    pool.generate(["inf"] * 100, timeout=float("inf"))
    assert len(pool._dispatcher._deadlines) <= 4000 + 1024 + 100


# ─── The TCP wire ────────────────────────────────────────────────────────────

@pytest.mark.timeout(60)
def test_tcp_without_the_pools_keys_cannot_join_and_a_bad_frame_cannot_break_it(make_pool):
    pool = make_pool(transport="tcp", engine_options={"delay_s": 0.05})
    endpoint = pool._dispatcher.transport.endpoint
    assert endpoint.startswith("tcp://127.0.0.1:")
    ctx = zmq.Context()
    try:
        # An impostor with the next identity but its own keys: the handshake fails, no frame arrives.
        slot = pool._dispatcher.slots[0]
        index, inc, token = slot.identity.decode()[1:].split(".")
        guess = f"w{index}.{int(inc) + 1}.{token}".encode()
        impostor = connect_dealer(ctx, endpoint, guess, CurveKeys.generate())
        impostor.send_multipart(protocol.encode(protocol.Tag.READY, {"index": 0, "capacity": 1, "pid": 1,
                                                                      "engine": "echo"}))
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(endpoint)
        plain.send_multipart([b"\x02\x03", b"garbage"])
        time.sleep(0.5)
        assert [pool.submit(f"ok{i}").result(timeout=10).text for i in range(10)] == [f"ok{i}" for i in range(10)]
        assert restarts(pool) == 0 and pool.stats()["dropped_frames"] == 0
        impostor.close(0)
        plain.close(0)
    finally:
        ctx.term()


@pytest.mark.timeout(90)
def test_a_malformed_frame_from_a_worker_drops_that_worker_not_the_pool(make_pool):
    # "!fault:badresult" makes the echo engine return a result of the wrong shape: the
    # dispatcher must treat it as a protocol violation of that worker (kill, retry elsewhere).
    pool = make_pool(engine_options={"faults": True, "delay_s": 0.05})
    futures = [pool.submit(f"r{i}") for i in range(20)]
    bad = pool.submit("!fault:badresult")
    assert [f.result(timeout=30).text for f in futures] == [f"r{i}" for i in range(20)]
    with pytest.raises(mpdp.WorkerCrashed, match="protocol"):
        bad.result(timeout=60)
    assert not pool.closed and pool.stats()["dropped_frames"] >= 1
    assert pool.submit("after").result(timeout=10).text == "after"
