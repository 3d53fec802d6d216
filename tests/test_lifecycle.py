"""Shutdown in every way a pool can end, cancellation and timeouts that reach the engine, and
backpressure that bounds what a producer can pile up."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import CancelledError

import psutil
import pytest

import mpdp
from conftest import FAST, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("no_child_left")

HOLD = {"faults": True, "delay_s": 60.0}     # requests stay in the engine; "!held" lists them


def held(pool) -> str:
    """Ids the echo engine of a one-worker pool holds right now (it answers "!held" at once)."""
    return pool.submit("!held").result(timeout=10).text


def gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


# ─── Shutdown ────────────────────────────────────────────────────────────────


@pytest.mark.timeout(30)
def test_close_waits_for_pending_requests_then_refuses_new_ones(make_pool):
    pool = make_pool(engine_options={"delay_s": 0.2})
    prompts = [f"p{i}" for i in range(100)]
    futures = [pool.submit(p) for p in prompts]
    pool.close(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result().text for f in futures] == prompts
    assert pool.closed
    with pytest.raises(mpdp.PoolClosed):
        pool.submit("late")
    pool.close()                      # twice is fine


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", [dict(wait=False), dict(cancel_pending=True)], ids=["wait=False", "cancel_pending"])
def test_close_without_waiting_fails_pending_and_aborts_running(make_pool, how):
    pool = make_pool(engine_options=HOLD, shutdown_timeout=30.0)
    futures = [pool.submit(f"p{i}") for i in range(50)]
    wait_until(lambda: sum(w["in_flight"] for w in pool.stats()["workers"]) == 50, 5, what="all in flight")
    pids = [w["pid"] for w in pool.stats()["workers"]]
    started = time.monotonic()
    pool.close(**how)
    # The engines held these for 60 s: closing did not wait for them, and nothing waits any more.
    assert time.monotonic() - started < 5
    for f in futures:
        with pytest.raises(mpdp.PoolClosed):
            f.result(timeout=0)
    assert gone(pids)


@pytest.mark.timeout(30)
def test_context_manager_drains_on_success_and_does_not_wait_on_error(no_child_left):
    with mpdp.Pool(engine="echo", num_workers=2, engine_options={"delay_s": 0.1}, **FAST) as pool:
        futures = [pool.submit(f"p{i}") for i in range(20)]
    assert [f.result(timeout=0).text for f in futures] == [f"p{i}" for i in range(20)]

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with mpdp.Pool(engine="echo", num_workers=2, engine_options=HOLD, **FAST) as pool:
            futures = [pool.submit(f"p{i}") for i in range(20)]
            raise KeyboardInterrupt
    assert time.monotonic() - started < 10
    assert all(isinstance(f.exception(timeout=0), mpdp.PoolClosed) for f in futures)


@pytest.mark.timeout(30)
def test_garbage_collection_ends_the_workers(no_child_left):
    def start() -> tuple[list[int], weakref.ref]:
        pool = mpdp.Pool(engine="echo", num_workers=2, engine_options=HOLD, **FAST)
        pool.submit("in flight when the pool is dropped")
        return [w["pid"] for w in pool.stats()["workers"]], weakref.ref(pool)

    pids, ref = start()
    gc.collect()
    assert ref() is None
    wait_until(lambda: gone(pids), 10, what="the workers of a collected pool to exit")


@pytest.mark.timeout(60)
def test_interpreter_exit_without_close_ends_the_workers(no_child_left):
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        import mpdp
        pool = mpdp.Pool(engine="echo", num_workers=2, engine_options={HOLD!r}, **{FAST!r})
        pool.submit("in flight at exit")
        print(json.dumps([w["pid"] for w in pool.stats()["workers"]]), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    wait_until(lambda: gone(pids), 5, what="the workers of an exited interpreter to exit")


@pytest.mark.timeout(30)
def test_close_does_not_wait_for_a_worker_that_is_restarting(make_pool):
    pool = make_pool(num_workers=2, shutdown_timeout=30.0)
    os.kill(pool.stats()["workers"][0]["pid"], signal.SIGKILL)
    wait_until(lambda: pool.stats()["workers"][0]["state"] == "starting", 5, interval=0.005,
               what="the worker to restart")
    started = time.monotonic()
    pool.close(wait=True)
    assert time.monotonic() - started < 5       # not shutdown_timeout


@pytest.mark.timeout(30)
def test_a_worker_that_cannot_start_fails_the_pool_with_its_reason(no_child_left):
    with pytest.raises(mpdp.WorkerStartError, match="exit code 2") as info:
        mpdp.Pool(engine="echo", num_workers=2, engine_options={"capacity": "abc"}, **FAST)
    assert "invalid literal for int() with base 10: 'abc'" in str(info.value)


# ─── Cancellation and timeouts reach the engine ──────────────────────────────


@pytest.mark.timeout(30)
def test_cancel_aborts_the_request_inside_the_engine(make_pool):
    pool = make_pool(num_workers=1, engine_options=HOLD)
    slow = pool.submit("slow")
    wait_until(lambda: pool.stats()["workers"][0]["in_flight"] == 1, 5, what="the request in flight")
    assert held(pool) == str(slow.request_id)
    assert slow.cancel() and slow.cancelled()
    with pytest.raises(CancelledError):
        slow.result(timeout=0)
    wait_until(lambda: held(pool) == "", 5, what="the engine to drop the cancelled request")
    stats = pool.stats()
    assert stats["pending"] == 0 and stats["workers"][0]["in_flight"] == 0
    assert stats["completed"] == stats["submitted"]
    following = pool.submit("the next request is served as usual")
    assert held(pool) == str(following.request_id)


@pytest.mark.timeout(30)
def test_timeout_fails_the_request_and_aborts_it_running_or_queued(make_pool):
    pool = make_pool(num_workers=1, engine_options={**HOLD, "capacity": 2})
    blocker = pool.submit("holds the second slot")
    running = pool.submit("in the engine", timeout=0.5)
    queued = pool.submit("never reaches the engine", timeout=0.5)   # no credit left for it
    started = time.monotonic()
    for f in (running, queued):
        with pytest.raises(mpdp.RequestTimeout, match="timeout"):
            f.result(timeout=5)
    assert time.monotonic() - started < 2
    assert held(pool) == str(blocker.request_id)     # the timed-out one was aborted, not left running
    assert blocker.cancel()
    wait_until(lambda: held(pool) == "", 5, what="the engine to drop the cancelled request")
    assert pool.stats()["pending"] == 0


# ─── Backpressure ────────────────────────────────────────────────────────────


@pytest.mark.timeout(60)
def test_producers_cannot_exceed_max_pending(make_pool):
    limit, producers, each = 20, 8, 150
    pool = make_pool(max_pending=limit, engine_options={"delay_s": 0.01})
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            s = pool.stats()
            peak[0] = max(peak[0], s["submitted"] - s["completed"], s["pending"])
            time.sleep(0.0005)

    def produce(t):
        futures = [pool.submit(f"t{t}-{i}") for i in range(each)]
        return [f.result(timeout=30).text for f in futures] == [f"t{t}-{i}" for i in range(each)]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=lambda t=t: results.append(produce(t))) for t in range(producers)]
    results: list[bool] = []
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    stop.set()
    watcher.join(5)
    assert results == [True] * producers
    # A producer checks for room and then posts: racing producers may each add one past the limit.
    assert limit <= peak[0] <= limit + producers


@pytest.mark.timeout(30)
def test_submit_blocks_while_full_and_resumes(make_pool):
    pool = make_pool(num_workers=1, max_pending=5, engine_options={"delay_s": 0.5})
    first = [pool.submit(f"p{i}") for i in range(5)]
    sixth = []
    t = threading.Thread(target=lambda: sixth.append(pool.submit("p5")))
    t.start()
    time.sleep(0.2)
    assert not sixth                         # blocked: five are pending
    t.join(10)
    assert sixth and all(f.done() for f in first[:1])
    assert sixth[0].result(timeout=10).text == "p5"


@pytest.mark.timeout(60)
def test_imap_streams_a_long_iterator_through_a_bounded_window(make_pool):
    pool = make_pool(max_pending=10_000, engine_options={"delay_s": 0.001})
    window, total = 50, 3000
    produced, peak = [0], [0]

    def items():
        for i in range(total):
            produced[0] += 1
            yield f"p{i}"

    out = []
    for completion in pool.imap(items(), window=window):
        out.append(completion.text)
        peak[0] = max(peak[0], produced[0] - len(out), pool.stats()["pending"])
    assert out == [f"p{i}" for i in range(total)]
    assert peak[0] <= window


@pytest.mark.timeout(30)
def test_generate_more_items_than_max_pending_streams_instead_of_deadlocking(make_pool):
    # generate() posts in chunks; a chunk larger than max_pending used to wait for room forever.
    pool = make_pool(max_pending=10, engine_options={"delay_s": 0.001})
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            s = pool.stats()
            peak[0] = max(peak[0], s["submitted"] - s["completed"])
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        prompts = [f"p{i}" for i in range(500)]
        assert [c.text for c in pool.generate(prompts)] == prompts
    finally:
        stop.set()
        watcher.join(5)
    assert peak[0] <= 10


@pytest.mark.timeout(60)
def test_close_from_a_done_callback_does_not_wait_for_itself(make_pool):
    # Done-callbacks run on the dispatcher thread; close() there must not wait for that thread.
    pool = make_pool()
    returned = threading.Event()

    def close_pool(_future):
        pool.close()
        returned.set()

    pool.submit("last one").add_done_callback(close_pool)
    assert returned.wait(10), "close() inside a done-callback hung"
    wait_until(lambda: pool.closed, 10, what="the pool to close")
    with pytest.raises(mpdp.PoolClosed):
        pool.submit("after")
