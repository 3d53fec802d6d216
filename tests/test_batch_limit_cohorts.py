"""The batch limit against a vLLM-like engine simulated step by step: the waves of a real run.

On one H100 (2,048 requests x 512 output tokens, 256-token prompts, 8B shape, CUDA graphs up to
512 sequences) the controller measured its first window while the engine was still prefilling
(2.4k tokens/s), took the next one for a win, and went from the CUDA-graph ceiling (the knee) to
448: a loss. Requests that start together finish together, so throughput came in ~16-second
waves (a cohort decodes, finishes, the next prefills), and 2-second windows read 3.4k to 21.6k
tokens/s. This engine reproduces that: chunked prefill under a token budget, decode steps whose
time grows with the sequences and their context, cohorts that stay in step, a pool queue.
"""

from __future__ import annotations

import random

import pytest

from mpdp.routing.batch_limit import LIGHT, SETTLED, BatchLimit, StepReport


class CohortEngine:
    """A vLLM-like engine behind a pool that keeps ``ctl.limit`` requests in it.

    Each step decodes every request past its prefill (one token each) and prefills waiting ones
    under a token budget; a request whose prefill completes makes its first token. Step time:
    a fixed part, a part per decoding sequence and per context token, a part per prefill token;
    above ``graph_max`` decoding sequences a step runs without a CUDA graph (slower per
    sequence); above ``knee`` (a KV cache too small, say) each extra sequence costs more.
    Reports leave every ``report_s`` of engine time, as a worker sends them.
    """

    def __init__(self, ctl: BatchLimit | None, *, limit: int | None = None, requests: int | None = None,
                 prompt: int = 256, output: int = 512, budget: int = 16384, graph_max: int = 512,
                 knee: int | None = None, noise: float = 0.02, seed: int = 0, report_s: float = 0.25,
                 finished_counted: bool = True, spread: float = 0.0):
        self.ctl, self.fixed = ctl, limit
        self.queue = requests if requests is not None else 10**9
        self.prompt, self.output, self.budget = prompt, output, budget
        self.graph_max, self.knee, self.noise = graph_max, knee, noise
        self.rng = random.Random(seed)
        self.report_s, self.finished_counted = report_s, finished_counted
        self.spread = spread                    # output lengths drawn from output * [1 - spread, 1 + spread]
        # Requests in the same state travel as one group:
        # [count, prompt tokens left, tokens made, tokens to make].
        self.held: list[list[int]] = []
        self.in_engine = 0
        self.t = 0.0
        self.tokens_out = 0
        self.history: list[tuple[float, int, str]] = []      # (time, limit, reason) per report
        self._report = StepReport(finished=0)
        self._next_report = report_s

    @property
    def limit(self) -> int:
        return self.ctl.limit if self.ctl is not None else self.fixed

    def step_time(self, decoding: int, context: int, prefill: int) -> float:
        t = 0.010 + 2e-5 * decoding + 1.5e-8 * context + prefill / 45_000
        if decoding > self.graph_max:
            t += 4e-5 * decoding                # no graph: each step prepared on the CPU
        if self.knee is not None and decoding > self.knee:
            t += 1.5e-4 * (decoding - self.knee)
        return t * (1 + self.rng.gauss(0, self.noise))

    def step(self) -> None:
        room = min(self.limit - self.in_engine, self.queue)
        if room > 0:
            parts = [room] if not self.spread else [room // 8 + (i < room % 8) for i in range(8)]
            for n in filter(None, parts):
                length = round(self.output * (1 + self.spread * self.rng.uniform(-1, 1)))
                self.held.append([n, self.prompt, 0, max(1, length)])
            self.in_engine += room
            self.queue -= room
        decoding = sum(g[0] for g in self.held if g[1] == 0)
        context = sum(g[0] * (self.prompt + g[2]) for g in self.held if g[1] == 0)
        for g in self.held:
            if g[1] == 0:
                g[2] += 1
        budget, prefill, made, groups = self.budget - decoding, 0, decoding, []
        for g in self.held:                     # chunked prefill, first come first served
            count, left, out, length = g
            if left == 0 or budget <= 0:
                groups.append(g)
                continue
            whole = min(count, budget // left)
            if whole:
                groups.append([whole, 0, 1, length])    # the prefill's own first token
                made += whole
                budget -= whole * left
                prefill += whole * left
            if whole < count and budget > 0:    # one request gets what is left of the budget
                groups.append([1, left - budget, 0, length])
                prefill += budget
                budget = 0
                whole += 1
            if whole < count:
                groups.append([count - whole, left, 0, length])
        busy = self.step_time(decoding, context, prefill)
        self.t += busy
        self.tokens_out += made
        self.held = [g for g in groups if g[2] < g[3]]
        finished = self.in_engine - sum(g[0] for g in self.held)
        self.in_engine -= finished
        rep = self._report
        rep.steps += 1
        rep.tokens += made
        rep.running += made
        rep.busy_s += busy
        rep.finished += finished
        if self.t >= self._next_report:
            self._next_report = self.t + self.report_s
            if self.ctl is not None:
                if not self.finished_counted:
                    rep.finished = None
                self.ctl.observe(self.t, rep, saturated=self.queue > 0)
                self.history.append((self.t, self.ctl.limit, self.ctl.reason))
            self._report = StepReport(finished=0)

    def run(self, seconds: float | None = None) -> float:
        """Until ``seconds`` of engine time have passed or every request is done; output tokens/s."""
        t0, n0 = self.t, self.tokens_out
        while (self.held or self.queue > 0) and (seconds is None or self.t - t0 < seconds):
            self.step()
        return (self.tokens_out - n0) / (self.t - t0)

    def time_at(self, limit: int, after: float = 0.0) -> float:
        """The share of reports, from ``after`` on, at ``limit``."""
        tail = [lim for t, lim, _ in self.history if t >= after]
        return sum(lim == limit for lim in tail) / len(tail)


def the_run_on_one_h100(ctl=None, limit=None, **kw) -> CohortEngine:
    """The bench's load: 2,048 requests x 512 tokens, 256-token prompts, graphs up to 512."""
    return CohortEngine(ctl, limit=limit, requests=2048, **kw)


# -- the simulated engine shows what the H100 showed -----------------------------------------------
def test_the_simulated_run_has_the_h100s_shape():
    sim = the_run_on_one_h100(limit=512)
    rate_512 = sim.run()
    rate_448 = the_run_on_one_h100(limit=448).run()
    rate_1024 = the_run_on_one_h100(limit=1024).run()
    assert rate_512 > 1.03 * rate_448                # the knee is the graph ceiling
    assert rate_512 > 1.2 * rate_1024                # past it, steps run without a graph
    # Waves: 2-second slices of a fixed-512 run read from a prefill dip to well above the mean.
    eng = CohortEngine(None, limit=512, noise=0.0)
    slices, made, t_end = [], 0, 2.0
    while eng.t < 60:
        n0 = eng.tokens_out
        eng.step()
        made += eng.tokens_out - n0
        if eng.t >= t_end:
            slices.append(made / 2.0)
            made, t_end = 0, t_end + 2.0
    mean = sum(slices) / len(slices)
    assert min(slices) < 0.35 * mean and max(slices) > 1.15 * mean


def test_the_old_measurement_leaves_the_ceiling_for_a_loss():
    """Windows by time alone (no finished counts), as the controller measured on the H100: a
    warm-up window and wave-shaped windows move it below the knee."""
    ctl = BatchLimit(512)
    sim = the_run_on_one_h100(ctl, finished_counted=False)
    sim.run()
    assert min(lim for _, lim, reason in sim.history if reason != LIGHT) < 512


# -- the controller stays at the graph ceiling through warm-up and waves ---------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stays_at_the_graph_ceiling_through_the_h100_run(seed):
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = the_run_on_one_h100(ctl, seed=seed)
    rate = sim.run()
    assert all(lim == 512 for _, lim, _ in sim.history), sorted({lim for _, lim, _ in sim.history})
    assert ctl.windows >= 1                          # it measured (past the warm-up), and kept 512
    fixed = the_run_on_one_h100(limit=512, seed=seed).run()
    assert rate >= 0.99 * fixed


@pytest.mark.parametrize("seed, spread, noise", [(0, 0.0, 0.02), (1, 0.0, 0.08), (2, 0.9, 0.02)])
def test_a_long_saturated_run_at_the_graph_ceiling_stays_there(seed, spread, noise):
    """Ten minutes of waves (or of lengths spread out, or noisier steps): the re-probes below the
    ceiling lose and it goes back, every time."""
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = CohortEngine(ctl, seed=seed, spread=spread, noise=noise)
    rate = sim.run(600)
    assert ctl.base == 512 and ctl.reason in (SETTLED, "probing")
    assert sim.time_at(512) >= 0.85
    fixed = CohortEngine(None, limit=512, seed=seed, spread=spread, noise=noise).run(600)
    assert rate >= 0.98 * fixed


def test_measures_nothing_while_the_engine_prefills():
    """The first reports are prefill (few tokens, few sequences making them): no window yet."""
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = CohortEngine(ctl)
    sim.run(5)
    assert ctl.windows == 0 and ctl.last_rate is None
    sim.run(60)
    assert ctl.windows >= 1 and ctl.last_rate > 10_000      # whole cohorts: the mean, not a dip


# -- ... and still finds a knee below it -----------------------------------------------------------
@pytest.mark.parametrize("seed, spread", [(0, 0.0), (1, 0.0), (2, 0.9)])
def test_finds_a_knee_below_the_graph_ceiling(seed, spread):
    """A KV cache too small for 512 (each sequence past 320 costs): worth leaving the ceiling."""
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = CohortEngine(ctl, knee=320, seed=seed, spread=spread)
    sim.run(900)
    assert abs(ctl.base - 320) <= 0.15 * 320, sim.history[-1]
    best = CohortEngine(None, limit=320, knee=320, seed=seed, spread=spread).run(300)
    ceiling = CohortEngine(None, limit=512, knee=320, seed=seed, spread=spread).run(300)
    assert ceiling < 0.9 * best
    assert CohortEngine(None, limit=ctl.base, knee=320, seed=seed, spread=spread).run(300) >= 0.95 * best


def test_finds_a_knee_below_an_advertised_ceiling_in_waves():
    """No graph hint (the ceiling is the advertised credit, 1024; graphs cover it all) and a knee
    at 600: it probes at once and goes down to it, measuring whole cohorts."""
    ctl = BatchLimit(1024)
    sim = CohortEngine(ctl, graph_max=1024, knee=600)
    sim.run(900)
    assert abs(ctl.base - 600) <= 0.15 * 600, sim.history[-1]
    assert sim.time_at(ctl.base, after=600) >= 0.6


def test_a_prefill_heavy_load_stays_at_the_graph_ceiling():
    """2,048-token prompts, 64-token answers: the engine never runs the whole limit at once (a
    request decodes while others prefill); it measures anyway and keeps the ceiling."""
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = CohortEngine(ctl, prompt=2048, output=64)
    rate = sim.run(300)
    assert ctl.windows >= 1 and ctl.base == 512
    assert rate >= 0.98 * CohortEngine(None, limit=512, prompt=2048, output=64).run(300)


def test_light_load_still_opens_to_the_ceiling():
    ctl = BatchLimit(512, graph_ceiling=True)
    sim = CohortEngine(ctl, requests=600)
    sim.run()
    assert (ctl.limit, ctl.reason) == (512, LIGHT)
