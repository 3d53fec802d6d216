"""How many requests one engine should hold: a probing controller, pure (no clocks, no I/O).

An engine's output tokens per second rise with the sequences it runs until the step stops
being cheap (vLLM: the batch outgrows the largest CUDA graph it captured and each step is
prepared on the CPU; or the KV cache fills and sequences are preempted), then fall. vLLM's
``max_num_seqs`` default sits past that knee on common cards, so the pool caps what each worker
holds (its credit in the scheduler) and lets the rest wait in the pool's queue.

The controller climbs the curve the way TCP Vegas or Netflix's concurrency-limits do: it
measures output tokens per second over a window at the current limit, tries a neighbour (a
bounded step down or up), keeps it only when it pays by more than ``margin`` (hysteresis: noise
does not move it), and otherwise goes back and, once both neighbours have lost, stays
("settled") and probes again later, less and less often while nothing changes (so a knee that
moves is found again, and a flat curve costs almost nothing). The limit never leaves
[floor, ceiling]. When the pool has nothing waiting the limit binds nothing: it opens to the
ceiling ("light load") and comes back to what it learned when the queue fills again.

Fed by what the worker measured, summed over a report (``StepReport``): engine steps, output
tokens, sequences that ran (summed over steps) and the seconds those steps took; and by the
dispatcher's view: whether requests were waiting for room (``saturated``).
"""

from __future__ import annotations

from dataclasses import dataclass

# The reasons shown in stats() and /metrics.
PROBING, SETTLED, LIGHT, FIXED, OFF, STARTING = "probing", "settled at knee", "light load", "fixed", "off", "starting"
REASONS = (STARTING, PROBING, SETTLED, LIGHT, FIXED, OFF)


@dataclass(slots=True)
class StepReport:
    """What a worker measured over some engine steps (sums over those steps)."""

    steps: int = 0
    tokens: int = 0           # output tokens the steps produced
    running: int = 0          # sequences that ran, summed over the steps
    busy_s: float = 0.0       # seconds the steps took (the engine was never idle in between)


class BatchLimit:
    """The limit on the requests one engine holds, moved by measured throughput."""

    def __init__(self, ceiling: int, *, start: int | None = None, floor: int | None = None,
                 window_s: float = 2.0, min_steps: int = 16, margin: float = 0.03,
                 step_frac: float = 0.125, min_step_frac: float = 1 / 32,
                 reprobe_s: float = 60.0, max_reprobe_s: float = 600.0, light_s: float = 1.0):
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.floor = max(1, min(ceiling, floor if floor is not None else ceiling // 8))
        self.window_s, self.min_steps, self.margin = window_s, min_steps, margin
        self.step_frac, self.min_step_frac = step_frac, min_step_frac
        self.reprobe_s, self.max_reprobe_s, self.light_s = reprobe_s, max_reprobe_s, light_s
        self.base = self._clamp(start if start is not None else ceiling)   # the incumbent
        self.limit = self.base
        self.reason = STARTING
        self.base_rate: float | None = None     # tokens/s measured at base (latest window)
        self.trial: int | None = None           # the neighbour being measured, if any
        self.direction = -1 if self.base >= ceiling else +1
        self.frac = step_frac
        self._tried: set[int] = set()           # directions that lost in this round
        self._won = False                       # a trial won in this round
        self._next_probe = 0.0                  # when a settled controller probes again
        self._backoff = reprobe_s
        self._changed_at: float | None = None   # the limit moved: wait for the engine to follow
        self._light_since: float | None = None
        self.windows = 0                        # measured windows (for tests and stats)
        self.last_rate: float | None = None
        self._reset_window()

    # -- the one entry point -------------------------------------------------------------------
    def observe(self, now: float, report: StepReport, saturated: bool) -> int:
        """Take one report; return the limit to apply from now on."""
        if not saturated:
            if self._light_since is None:
                self._light_since = now
            if now - self._light_since >= self.light_s and self.reason != LIGHT:
                self.trial = None               # an unfinished probe means nothing now
                self.limit, self.reason = self.ceiling, LIGHT
                self._reset_window()
            return self.limit
        self._light_since = None
        if self.reason == LIGHT:                # the queue filled again: back to what was learned
            self._set(now, self.base, SETTLED if self.base_rate is not None else STARTING)
            return self.limit
        if report.steps <= 0 or report.busy_s <= 0:
            return self.limit
        if self._changed_at is not None:
            if not self._followed(report) and now - self._changed_at < 5 * self.window_s:
                return self.limit               # the engine still holds what the old limit let in
            self._changed_at = None
            return self.limit                   # this report straddles the change: skip it too
        w = self._window
        w.steps += report.steps
        w.tokens += report.tokens
        w.running += report.running
        w.busy_s += report.busy_s
        if w.busy_s >= self.window_s and w.steps >= self.min_steps:
            self._decide(now, w.tokens / w.busy_s)
            self._reset_window()
        return self.limit

    # -- the policy -----------------------------------------------------------------------------
    def _decide(self, now: float, rate: float) -> None:
        self.windows += 1
        self.last_rate = rate
        if self.trial is None:                  # measured the incumbent
            self.base_rate = rate
            if self.reason == SETTLED and now < self._next_probe:
                return
            self._probe(now)
            return
        trial, self.trial = self.trial, None
        if rate > self.base_rate * (1 + self.margin):      # it pays: keep it, go on that way
            self.base, self.base_rate, self._won = trial, rate, True
            self.frac = min(0.25, self.frac * 1.5)
            self._set(now, trial, PROBING)
            self._probe(now)
            return
        self._tried.add(self.direction)         # it does not: back to the incumbent
        if not self._won and -self.direction not in self._tried:
            self.direction = -self.direction    # measure the incumbent again, then the other side
            self._set(now, self.base, PROBING)
            return
        self._settle(now)

    def _probe(self, now: float) -> None:
        for direction in (self.direction, -self.direction):
            if direction in self._tried:
                continue
            step = max(1, round(self.base * self.frac), round(self.ceiling * self.min_step_frac))
            candidate = self._clamp(self.base + direction * min(step, max(1, self.base // 4)))
            if candidate != self.base:
                self.direction, self.trial = direction, candidate
                self._set(now, candidate, PROBING)
                return
            self._tried.add(direction)          # at the floor or the ceiling: nothing that way
        self._settle(now)

    def _settle(self, now: float) -> None:
        moved = self._won
        self._tried.clear()
        self._won = False
        self.frac = max(self.min_step_frac, self.frac / 2)
        self._backoff = self.reprobe_s if moved else min(self.max_reprobe_s, self._backoff * 2)
        self._next_probe = now + self._backoff
        self._set(now, self.base, SETTLED)
        # The next round starts the way the knee was last found to lie; down first at the ceiling.
        if self.base >= self.ceiling:
            self.direction = -1

    # -- helpers --------------------------------------------------------------------------------
    def _set(self, now: float, limit: int, reason: str) -> None:
        if limit != self.limit:
            self._changed_at = now
            self._reset_window()
        self.limit, self.reason = limit, reason

    def _followed(self, report: StepReport) -> bool:
        """The engine runs about what the limit says (a cut waits for requests to finish)."""
        mean = report.running / report.steps
        return 0.85 * self.limit <= mean <= 1.05 * self.limit + 1

    def _clamp(self, value: int) -> int:
        return max(self.floor, min(self.ceiling, int(value)))

    def _reset_window(self) -> None:
        self._window = StepReport()
