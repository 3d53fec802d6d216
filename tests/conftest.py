"""Shared fixtures: pools with short heartbeats that are always closed, and a check that no test
leaves a child process behind (as loky's tests do); the run's temporary folders go with it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import psutil
import pytest

import mpdp

# Quick liveness settings: a hung engine (one echo step, normally microseconds, past 5 s) or a
# frozen worker (no heartbeat for 5 s) is caught in seconds. Heartbeats come from a thread of the
# worker's own every 0.1 s, so a loaded machine (load 7 on 2 cores) delays them by tenths of a
# second, never seconds: these bounds are outcomes to wait for, not margins to race.
FAST = dict(heartbeat_interval=0.1, heartbeat_timeout=5.0, step_timeout=5.0, shutdown_timeout=5.0)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest keeps the tmp_path folders of its last three runs (about 1 GB of this suite's) in the
    # system's temporary folder; a run of this suite keeps none. `--basetemp DIR` keeps them in DIR.
    if config.option.basetemp is None:
        config._mpdp_basetemp = tempfile.mkdtemp(prefix="mpdp-tests-")
        config.option.basetemp = config._mpdp_basetemp
        # Importing transformers imports torch's dynamo, which makes its compile cache folder
        # (torchinductor_USER in the system's temporary folder) at import; the tests and the
        # workers they start (they inherit the environment) keep it in the run's folder instead.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(config._mpdp_basetemp, "torchinductor"))


def pytest_unconfigure(config):
    path = getattr(config, "_mpdp_basetemp", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def live_children() -> set[psutil.Process]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it is truthy (returns its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def restarts(pool) -> list[int]:
    """Each worker's restarts so far. A test on a shared (module) pool compares these with what
    they were when it began: another test's crash must not fail it."""
    return [w["restarts"] for w in pool.stats()["workers"]]


def full_size(pool) -> bool:
    """Every worker READY again (after crashes and restarts)."""
    return all(w["state"] == "ready" for w in pool.stats()["workers"])


@pytest.fixture
def no_child_left():
    """Fail a test that leaves a process behind it did not find (waiting up to 10 s for exits)."""
    before = live_children()
    yield
    deadline = time.monotonic() + 10.0
    while (left := live_children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:                 # do not let one leak fail every later test too
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()[:3]) for p in left]}"


@pytest.fixture
def make_pool(no_child_left):
    """``make_pool(**kwargs)``: an echo pool with short heartbeats; closed (not drained) after the test."""
    pools = []

    def make(**kwargs):
        kwargs = {"engine": "echo", "num_workers": 2, **FAST, **kwargs}
        pool = mpdp.Pool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(wait=False)
