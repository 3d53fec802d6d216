"""Workers that die: a table of real crashes (in the style of CPython's test_deadlock.py and
loky's crash tests), chaos under load, and the death of the process that holds the pool.

The echo engine with ``faults`` on crashes its own worker when it receives a prompt
``"!fault:<kind>"``, so every row below kills a real process in a real way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import mpdp
from conftest import FAST, full_size, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("no_child_left")


def workers(pool) -> list[dict]:
    return pool.stats()["workers"]


def total_restarts(pool) -> int:
    return sum(w["restarts"] for w in workers(pool))


def count_resolutions(futures) -> Counter:
    """How many times each future's done-callbacks ran: exactly once each, or something resolved twice."""
    calls: Counter = Counter()
    lock = threading.Lock()

    def seen(f):
        with lock:
            calls[id(f)] += 1

    for f in futures:
        f.add_done_callback(seen)
    return calls


# (fault, the error the caller sees, text it must contain, the worker's exit code, fewest restarts it
# costs). A crash first retries everything in parallel, then splits the suspects in halves: a poison
# among 200 neighbours costs at least 2 crashes and at most 2 + log2(200) + 1.
MAX_BISECTION_RESTARTS = 10
FAILURES = [
    ("kill", mpdp.WorkerCrashed, "signal SIGKILL", -signal.SIGKILL, 2),
    ("segv", mpdp.WorkerCrashed, "signal SIGSEGV", -signal.SIGSEGV, 2),
    ("exit", mpdp.WorkerCrashed, "exit code 3", 3, 2),
    ("raise", mpdp.WorkerCrashed, "exit code 1", 1, 2),
    ("hang", mpdp.WorkerCrashed, "a hung engine", -signal.SIGKILL, 2),   # past FAST's step_timeout
    ("reject", ValueError, "asked to reject", None, 0),     # a bad request: fails alone, no crash
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault, error, text, exitcode, restarts", FAILURES,
                         ids=[row[0] for row in FAILURES])
def test_a_poison_request_fails_alone_and_the_pool_recovers(make_pool, fault, error, text, exitcode,
                                                             restarts):
    # delay_s keeps the innocent requests in flight next to the poison when it strikes.
    pool = make_pool(engine_options={"faults": True, "delay_s": 0.05})
    before = [f"before {i}" for i in range(100)]
    after = [f"after {i}" for i in range(100)]
    innocent = [pool.submit(p) for p in before]
    poison = pool.submit(f"!fault:{fault}")
    innocent += [pool.submit(p) for p in after]
    calls = count_resolutions([*innocent, poison])

    with pytest.raises(error, match=text) as info:
        poison.result(timeout=180)       # a hang costs step_timeout (5 s) per crash it takes
    # Everything around it succeeds, each exactly once.
    assert [f.result(timeout=30).text for f in innocent] == before + after
    wait_until(lambda: full_size(pool), 15, what="every worker READY again")
    stats = pool.stats()
    assert stats["submitted"] == stats["completed"] == 201 and stats["pending"] == 0
    # Done-callbacks run on their own thread: wait for all of them, then none may have run twice.
    wait_until(lambda: sum(calls.values()) >= 201, 10, what="every done-callback")
    assert sorted(calls.values()) == [1] * 201
    # Each innocent result was accepted once: no request ran to completion twice.
    assert sum(w["requests"] for w in stats["workers"]) == 200 + (fault == "reject")
    if restarts:
        assert restarts <= total_restarts(pool) <= MAX_BISECTION_RESTARTS
    else:
        assert total_restarts(pool) == 0
    if error is mpdp.WorkerCrashed:
        crash = info.value
        assert 2 <= crash.attempts <= MAX_BISECTION_RESTARTS and crash.exitcode == exitcode
        assert f"on {crash.attempts} workers that died" in str(crash)
    if fault == "raise":             # the remote traceback and the worker's last output travel along
        assert "RuntimeError: the echo engine failed on purpose (raise)" in str(info.value)
        assert "Traceback" in info.value.stderr_tail
    assert pool.submit("still serving").result(timeout=10).text == "still serving"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_crashes", [1, 3])
def test_max_crashes_is_how_many_workers_a_request_may_take_down(make_pool, max_crashes):
    # A poison fails once it has crashed max_crashes workers and the last time it was isolated
    # (alone among suspects): with neighbours on its early crashes it may take a few more.
    pool = make_pool(engine_options={"faults": True, "delay_s": 0.05}, max_crashes=max_crashes)
    innocent = [pool.submit(f"r{i}") for i in range(50)]
    with pytest.raises(mpdp.WorkerCrashed, match="SIGKILL") as info:
        pool.submit("!fault:kill").result(timeout=30)
    assert max_crashes <= info.value.attempts <= max_crashes + MAX_BISECTION_RESTARTS
    if max_crashes == 1:
        # No retry at all: what shared the worker with the poison fails with it (as in loky).
        outcomes = [f.exception(timeout=30) for f in innocent]
        assert all(e is None or isinstance(e, mpdp.WorkerCrashed) for e in outcomes)
    else:
        assert [f.result(timeout=30).text for f in innocent] == [f"r{i}" for i in range(50)]
    wait_until(lambda: full_size(pool), 15, what="every worker READY again")
    assert total_restarts(pool) == info.value.attempts


@pytest.mark.timeout(30)
def test_a_death_is_seen_within_a_second_and_its_requests_wait_for_the_restart(make_pool):
    pool = make_pool(num_workers=1, engine_options={"delay_s": 0.5})
    prompts = [f"held {i}" for i in range(3)]
    futures = [pool.submit(p) for p in prompts]
    wait_until(lambda: workers(pool)[0]["in_flight"] == 3, 5, what="requests in flight")
    pid = workers(pool)[0]["pid"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: total_restarts(pool) == 1, 2, interval=0.005, what="the death to be noticed")
    assert time.monotonic() - killed < 1.0
    # The one worker comes back (new pid) and serves the requests it lost; none is failed.
    assert [f.result(timeout=15).text for f in futures] == prompts
    assert workers(pool)[0]["pid"] != pid and full_size(pool)


@pytest.mark.timeout(120)
def test_chaos_10000_requests_from_80_threads_under_random_sigkills(make_pool):
    # Innocent requests may be in flight at several kills: allow many crashes per request.
    pool = make_pool(num_workers=2, max_crashes=1000, engine_options={"delay_s": 0.002})
    num_threads, per_thread = 80, 125
    done = threading.Event()
    kills = []

    def killer():
        # Kill at random points of the run (not of the clock: the run may take 2 s or 20 s).
        rng = random.Random(1234)
        points = sorted(rng.sample(range(200, num_threads * per_thread - 500), 10))
        while points and not done.wait(0.005):
            if pool.stats()["completed"] < points[0]:
                continue
            ready = [w for w in workers(pool) if w["state"] == "ready"]
            if ready:
                points.pop(0)
                pid = rng.choice(ready)["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    def client(t):
        prompts = [f"t{t}-{i}" for i in range(per_thread)]
        out = []
        for i in range(0, per_thread, 5):           # a few at a time, waiting for each batch
            futures = [pool.submit(p) for p in prompts[i:i + 5]]
            out += [f.result(timeout=60).text for f in futures]
        return prompts, out

    chaos = threading.Thread(target=killer, daemon=True)
    chaos.start()
    try:
        with ThreadPoolExecutor(num_threads) as ex:
            results = list(ex.map(client, range(num_threads)))
    finally:
        done.set()
        chaos.join(5)
    for prompts, out in results:
        assert out == prompts
    wait_until(lambda: full_size(pool), 15, what="every worker READY again")
    stats = pool.stats()
    assert stats["submitted"] == stats["completed"] == num_threads * per_thread
    assert sum(w["requests"] for w in stats["workers"]) == num_threads * per_thread   # no duplicates
    assert len(set(kills)) >= 5
    assert total_restarts(pool) == len(set(kills))


@pytest.mark.timeout(60)
def test_sigkill_of_the_pool_process_takes_every_worker_down_within_5s():
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {REPO!r})
        import mpdp
        pool = mpdp.Pool(engine="echo", num_workers=2, engine_options={{"delay_s": 30}}, **{FAST!r})
        pool.submit("in flight while the parent dies")
        print(json.dumps([w["pid"] for w in pool.stats()["workers"]]), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        parent.kill()
        parent.wait(5)
        killed = time.monotonic()

        def survivors():
            alive = []
            for pid in pids:
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
                except psutil.NoSuchProcess:
                    pass
            return alive

        wait_until(lambda: not survivors(), 5, what=f"workers {pids} to exit after their parent")
        assert time.monotonic() - killed < 5
    finally:
        parent.kill()
        parent.wait(5)
