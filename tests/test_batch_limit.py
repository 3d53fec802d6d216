"""The batch limit: the pure controller against a simulated engine whose throughput has a knee,
the dispatcher's per-worker limits and underfill notice, and a real pool on the echo engine."""

from __future__ import annotations

import logging
import random
import threading

import pytest

import mpdp
from conftest import wait_until
from mpdp.core.batch_limits import BatchLimits, resolve
from mpdp.routing.batch_limit import FIXED, LIGHT, OFF, PROBING, SETTLED, BatchLimit, StepReport


# -- a simulated engine ----------------------------------------------------------------------------
def rate(n: float, knee: float, peak: float = 10_000.0) -> float:
    """Output tokens/s at n running sequences: rises (concave) to the knee, then falls."""
    if n <= knee:
        return peak * (n / knee) ** 0.6
    return peak * max(0.2, 1 - 0.5 * (n - knee) / knee)


class SimEngine:
    """Reports as a worker sends them (10 steps each). A raised limit is filled at once (requests
    wait in the pool); a cut takes effect only as running requests finish (``lag`` a report)."""

    def __init__(self, ctl: BatchLimit, knee, noise: float = 0.0, demand: int = 10**9, lag: int = 64, seed: int = 0):
        self.ctl, self.knee, self.noise, self.demand, self.lag = ctl, knee, noise, demand, lag
        self.rng = random.Random(seed)
        self.t = 0.0
        self.n = min(ctl.limit, demand)
        self.history: list[tuple[float, int, str]] = []

    def run(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end:
            target = min(self.ctl.limit, self.demand)
            self.n = target if target >= self.n else max(target, self.n - self.lag)
            knee = self.knee(self.t) if callable(self.knee) else self.knee
            r = rate(self.n, knee) * (1 + self.rng.gauss(0, self.noise))
            busy = 10 * self.n / r
            self.t += busy
            self.ctl.observe(self.t, StepReport(10, 10 * self.n, 10 * self.n, busy),
                             saturated=self.demand > self.ctl.limit)
            self.history.append((self.t, self.ctl.limit, self.ctl.reason))

    def changes_after(self, t0: float) -> int:
        limits = [lim for t, lim, _ in self.history if t >= t0]
        return sum(a != b for a, b in zip(limits, limits[1:]))


# -- the pure controller ---------------------------------------------------------------------------
def test_converges_near_the_knee_from_the_ceiling():
    ctl = BatchLimit(1024)
    sim = SimEngine(ctl, knee=512)
    sim.run(60)
    assert ctl.reason == SETTLED
    assert abs(ctl.limit - 512) <= 0.1 * 512, sim.history[-1]
    assert rate(ctl.limit, 512) >= 0.96 * rate(512, 512)
    settled_at = next(t for t, _, reason in sim.history if reason == SETTLED)
    assert settled_at <= 30                     # a handful of 2-second windows, not a slow crawl


def test_a_hint_at_the_knee_stays_there():
    """vLLM: the largest CUDA graph as the ceiling; probing below it does not pay, so it stays."""
    ctl = BatchLimit(512, start=512)
    sim = SimEngine(ctl, knee=512)
    sim.run(30)
    assert (ctl.limit, ctl.reason) == (512, SETTLED)


def test_climbs_when_started_low():
    ctl = BatchLimit(1024, start=128)
    sim = SimEngine(ctl, knee=600)
    sim.run(90)
    assert abs(ctl.limit - 600) <= 0.15 * 600
    assert next(t for t, _, reason in sim.history if reason == SETTLED) <= 60


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stays_near_the_knee_under_noise(seed):
    ctl = BatchLimit(1024, start=512)
    sim = SimEngine(ctl, knee=512, noise=0.03, seed=seed)
    sim.run(600)
    tail = [lim for t, lim, _ in sim.history if t > 60]
    assert all(abs(lim - 512) <= 0.2 * 512 for lim in tail), sorted(set(tail))
    # Time-weighted: it spends nearly all of its time near the knee.
    near = sum(abs(lim - 512) <= 0.07 * 512 for lim in tail) / len(tail)
    assert near >= 0.85
    assert sim.changes_after(60) <= 24          # re-probes back off: no flapping on noise


def test_opens_up_at_light_load_and_comes_back():
    ctl = BatchLimit(1024, start=512)
    sim = SimEngine(ctl, knee=512)
    sim.run(20)
    learned = ctl.base
    sim.demand = 100                             # callers keep only 100 in flight
    sim.run(10)
    assert (ctl.limit, ctl.reason) == (1024, LIGHT)   # holds nothing back
    sim.demand = 10**9
    sim.run(1)
    assert ctl.limit == learned and ctl.reason != LIGHT


def test_never_below_the_floor_never_above_the_ceiling():
    ctl = BatchLimit(256, floor=64, start=64)
    sim = SimEngine(ctl, knee=16)                # the curve says smaller and smaller
    sim.run(120)
    assert ctl.limit == 64
    ctl2 = BatchLimit(256)
    SimEngine(ctl2, knee=4096).run(60)           # the curve says bigger and bigger
    assert ctl2.limit == 256


def test_reacts_when_the_knee_moves():
    ctl = BatchLimit(1024, start=512, reprobe_s=10, max_reprobe_s=20)
    sim = SimEngine(ctl, knee=lambda t: 512 if t < 60 else 300)
    sim.run(60)
    assert abs(ctl.limit - 512) <= 0.1 * 512
    sim.run(240)
    assert abs(ctl.limit - 300) <= 0.15 * 300, sim.history[-1]


def test_a_cut_is_measured_only_once_the_engine_follows():
    ctl = BatchLimit(1024)
    ctl.observe(0.0, StepReport(20, 20_000, 20_000, 2.5), saturated=True)
    assert ctl.reason == PROBING and ctl.limit < 1024
    windows = ctl.windows
    for i in range(3):                           # still 1000 running: not yet the trial's number
        ctl.observe(1.0 + i, StepReport(20, 20_000, 20_000, 2.5), saturated=True)
    assert ctl.windows == windows


# -- per-worker limits in the dispatcher -----------------------------------------------------------
def test_settings_off_fixed_adaptive():
    off = BatchLimits("off")
    assert off.worker_ready(0, 1152, {"graph_max": 512}) == 1152
    assert off.describe(0)["batch_limit_reason"] == OFF
    fixed = BatchLimits(300)
    assert fixed.worker_ready(0, 1152, {}) == 300
    assert fixed.describe(0) == {"batch_limit": 300, "batch_limit_reason": FIXED}
    auto = BatchLimits("adaptive")
    assert auto.worker_ready(0, 1152, {"graph_max": 512}) == 512      # the largest CUDA graph
    assert auto.worker_ready(1, 1152, {}) == 1152
    assert auto.set(64) == {0: 64, 1: 64} and auto.set("off") == {0: 1152, 1: 1152}
    with pytest.raises(ValueError):
        BatchLimits("sometimes")
    with pytest.raises(ValueError):
        mpdp.PoolConfig(batch_limit=0)
    with pytest.raises(ValueError):
        mpdp.PoolConfig(batch_limit=True)


def test_a_graph_ceiling_is_known_as_one():
    """A ceiling below the advertised credit is the largest CUDA graph: the controller starts there
    and leaves it only on clear evidence (tests/test_batch_limit_cohorts.py)."""
    limits = BatchLimits("adaptive")
    limits.worker_ready(0, 1152, {"graph_max": 512})
    limits.worker_ready(1, 1152, {})
    limits.worker_ready(2, 300, {"graph_max": 512})
    assert [limits.workers[i].controller.graph_ceiling for i in range(3)] == [True, False, False]
    body = {"steps": 10, "tokens": 5000, "running": 5000, "busy_s": 0.3, "finished": 12}
    assert limits.steps(0, body, True, 1.0) is None            # counted: warming up, nothing decided
    assert limits.workers[0].controller.limit == 512


def test_steps_frames_carry_finished_requests():
    from mpdp.wire import protocol

    body = {"steps": 3, "tokens": 9, "running": 9, "busy_s": 0.1, "finished": 2}
    assert protocol.steps_from_wire(body) == body
    for bad in ({**body, "finished": -1}, {**body, "finished": 1.5}, {k: v for k, v in body.items() if k != "finished"}):
        with pytest.raises(protocol.ProtocolError):
            protocol.steps_from_wire(bad)


def test_auto_is_the_engines_own_default():
    from mpdp.engines import engine_class

    assert resolve("auto", engine_class("echo")) == "off"
    assert resolve("auto", engine_class("hf")) == "off"
    assert resolve("auto", engine_class("vllm")) == "adaptive"
    assert resolve(128, engine_class("vllm")) == 128


def test_underfill_is_said_once(caplog):
    limits = BatchLimits("adaptive", underfill_after_s=30.0)
    for i in range(4):
        limits.worker_ready(i, 1152, {"graph_max": 512})
    with caplog.at_level(logging.WARNING, logger="mpdp"):
        limits.tick(0.0, 80, 0, 80)
        for s in range(1, 120):                 # 80 threads on 4 GPUs: 20 a GPU, nothing waiting
            limits.tick(float(s), 80, 0, 80)
    notes = [r for r in caplog.records if "in flight" in r.getMessage()]
    assert len(notes) == 1
    text = notes[0].getMessage()
    assert "about 80 requests in flight (20 per worker)" in text and "2048" in text
    assert "threads" in text and "generate" in text
    assert limits.underfill["fill"] == 2048


def test_no_underfill_while_requests_wait():
    limits = BatchLimits("adaptive", underfill_after_s=5.0)
    limits.worker_ready(0, 1152, {"graph_max": 512})
    for s in range(60):
        limits.tick(float(s), 2000, 1500, 500)
    assert limits.underfill is None


def test_metrics_show_the_limit_and_the_underfill():
    from prometheus_client import CollectorRegistry, generate_latest

    from mpdp.server.metrics import PoolCollector

    class FakePool:
        def stats(self):
            return {"workers": [{"index": 0, "state": "ready", "batch_limit": 512,
                                 "batch_limit_reason": SETTLED}],
                    "waiting": 0, "pending": 3,
                    "underfill": {"mean_in_flight": 20.0, "fill": 2048, "advice": "send more"}}

    registry = CollectorRegistry()
    registry.register(PoolCollector(FakePool()))
    text = generate_latest(registry).decode()
    assert 'mpdp:batch_limit{worker="0"} 512.0' in text
    assert 'mpdp:batch_limit_reason{reason="settled at knee",worker="0"} 1.0' in text
    assert "mpdp:pool_underfilled 1.0" in text and "mpdp:pool_underfill_fill 2048.0" in text


# -- a real pool (echo engine: the plumbing) -------------------------------------------------------
@pytest.mark.timeout(120)
def test_fixed_limit_holds_requests_in_the_pool_in_order(make_pool):
    pool = make_pool(num_workers=1, batch_limit=2, engine_options={"delay_s": 0.02})
    order, lock = [], threading.Lock()
    futures = [pool.submit(f"r{i}", max_tokens=8) for i in range(30)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: (lock.acquire(), order.append(i), lock.release()))
    seen = []
    while not all(f.done() for f in futures):
        seen.append(pool.stats()["workers"][0]["in_flight"])
    assert [f.result(timeout=30).text for f in futures] == [f"r{i}" for i in range(30)]
    assert max(seen) <= 2
    w = pool.stats()["workers"][0]
    assert (w["batch_limit"], w["batch_limit_reason"]) == (2, FIXED)
    assert sorted(order) == list(range(30))
    assert order[:2] == [0, 1] or sorted(order[:2]) == [0, 1]     # first in, first served


@pytest.mark.timeout(120)
def test_adaptive_on_echo_serves_everything_and_reports(make_pool):
    pool = make_pool(num_workers=2, batch_limit="adaptive", engine_options={"delay_s": 0.01, "capacity": 64})
    prompts = [f"p{i}" for i in range(2000)]
    assert [c.text for c in pool.generate(prompts, max_tokens=8)] == prompts
    workers = pool.stats()["workers"]
    for w in workers:
        assert 8 <= w["batch_limit"] <= 64 and w["batch_limit_ceiling"] == 64
        assert w["batch_limit_reason"] in ("starting", "probing", "settled at knee", "light load")
    assert wait_until(lambda: all(w["batch_limit_reason"] == LIGHT for w in pool.stats()["workers"]),
                      30, what="light load once the queue is empty")


@pytest.mark.timeout(120)
def test_changing_the_limit_mid_run_loses_nothing(make_pool):
    pool = make_pool(num_workers=2, engine_options={"delay_s": 0.01})
    assert pool.stats()["workers"][0]["batch_limit_reason"] == OFF        # echo: off by default
    futures = [pool.submit(f"q{i}", max_tokens=8) for i in range(600)]
    for setting in (3, "adaptive", 1, "off", 50):
        pool.set_batch_limit(setting)
    assert [f.result(timeout=60).text for f in futures] == [f"q{i}" for i in range(600)]
    assert wait_until(lambda: pool.stats()["workers"][0]["batch_limit"] == 50, 10, what="the last setting")
    with pytest.raises(ValueError):
        pool.set_batch_limit(-1)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_child_left")
def test_the_benchmarks_pool_runner_switches_limits_on_one_engine():
    from bench.batch_limit import LimitPoolRunner

    runner = LimitPoolRunner({"model": "x", "engine": "echo", "gpus": [], "engine_options": {"delay_s": 0.01},
                              "batch_limit": "adaptive"})
    try:
        requests = [([100 + i, 200, 300], 8) for i in range(200)]
        for mode in ("adaptive", "off", 7):
            runner.prepare(requests, {}, mode, 1)
            res = runner.go()
            assert res["requests"] == 200 and res["errors"] == 0
        assert res["final_limit"] == 7 and res["final_reason"] == FIXED
    finally:
        runner.close()


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("no_child_left")
def test_the_loads_benchmark_runs_each_load_under_each_setting(tmp_path):
    """bench.batch_loads on the echo engine: every load under both settings, nothing lost, and
    each row says which setting it ran under (the GPU run's table is built from these rows)."""
    import json

    from bench import batch_loads

    out = tmp_path / "loads.json"
    rc = batch_loads.main(["--engine", "echo", "--model", "echo-model", "--engine-options", '{"delay_s": 0.001}',
                           "--modes", "adaptive,off", "--scale", "0.02", "--dspy-threads", "4", "--procs", "1",
                           "--budget-s", "200", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and not data["failures"] and not data["skipped"], data
    rows = data["results"]
    assert sorted((r["load"], r["mode"]) for r in rows) == sorted(
        (load, mode) for load in batch_loads.LOADS for mode in ("adaptive", "off"))
    for r in rows:
        assert r.get("errors", 0) == 0 and r["requests"] > 0
        assert (r["final_reason"] == OFF) == (r["mode"] == "off")
    # The same requests under each setting: the same tokens out.
    by = {(r["load"], r["mode"]): r for r in rows}
    for load in ("prefill", "mixed", "serve512"):
        assert by[(load, "adaptive")]["output_tokens"] == by[(load, "off")]["output_tokens"] > 0
