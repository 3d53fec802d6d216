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

What it measures, and when. A window's rate is output tokens per second of step time. Workloads
move in waves: requests that start together finish together, and the next ones prefill together
(on one H100, 2,048 requests x 512 tokens came in ~16-second cohorts whose 2-second windows read
3.4k to 21.6k tokens/s), and a pool's first seconds are nearly all prefill. So, where the reports
count finished requests:

- after a start, a change or a light-load spell, nothing is measured until the engine runs about
  what the limit says (decode steps hold it: prefilling requests produce no tokens), and then
  until its batch has turned over once (as many requests finished as it runs): the warm-up;
- a window lasts ``turnovers`` turnovers (and at least ``window_s``, at most ``max_window_s``).
  Its ends fall where requests finish, so in waves each window holds whole cohorts, prefill and
  decode in proportion, whatever the limit: the rates of two limits compare like for like;
- when the ceiling is the largest CUDA graph (``graph_ceiling``) it starts there and stays
  ("settled at knee") for ``reprobe_s`` before its first probe, and a limit below it is kept
  only when it wins by ``ceiling_margin`` in ``ceiling_confirm`` windows in a row: up to the
  ceiling a larger batch costs a step little more (the weights are read once for all of it),
  so a knee below it is rare (a KV cache too small, say) and must show clearly.

Reports that do not count finished requests (``finished=None``) are measured by time alone: a
window is ``window_s`` of steps.

Fed by what the worker measured, summed over a report (``StepReport``): engine steps, output
tokens, sequences that ran (summed over steps), the seconds those steps took and the requests
that finished; and by the dispatcher's view: whether requests were waiting for room
(``saturated``).
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
    finished: int | None = None   # requests that finished; None: not counted (windows by time)


class BatchLimit:
    """The limit on the requests one engine holds, moved by measured throughput."""

    def __init__(self, ceiling: int, *, start: int | None = None, floor: int | None = None,
                 window_s: float = 2.0, min_steps: int = 16, margin: float = 0.03,
                 step_frac: float = 0.125, min_step_frac: float = 1 / 32,
                 reprobe_s: float = 60.0, max_reprobe_s: float = 600.0, light_s: float = 1.0,
                 turnovers: float = 1.0, max_window_s: float = 60.0, graph_ceiling: bool = False,
                 ceiling_margin: float = 0.06, ceiling_confirm: int = 2):
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.floor = max(1, min(ceiling, floor if floor is not None else ceiling // 8))
        self.window_s, self.min_steps, self.margin = window_s, min_steps, margin
        self.step_frac, self.min_step_frac = step_frac, min_step_frac
        self.reprobe_s, self.max_reprobe_s, self.light_s = reprobe_s, max_reprobe_s, light_s
        self.turnovers, self.max_window_s = turnovers, max_window_s
        self.graph_ceiling, self.ceiling_margin, self.ceiling_confirm = graph_ceiling, ceiling_margin, ceiling_confirm
        self.base = self._clamp(start if start is not None else ceiling)   # the incumbent
        self.limit = self.base
        self.reason = STARTING
        self.base_rate: float | None = None     # tokens/s measured at base (latest window)
        self.trial: int | None = None           # the neighbour being measured, if any
        self._trial_wins = 0                    # windows the trial has won so far
        self.direction = -1 if self.base >= ceiling else +1
        self.frac = step_frac
        self._tried: set[int] = set()           # directions that lost in this round
        self._won = False                       # a trial won in this round
        self._next_probe = 0.0                  # when a settled controller probes again
        self._backoff = reprobe_s
        self._changed_at: float | None = None   # the limit moved: wait for the engine to follow
        self._counted: bool | None = None       # the reports count finished requests (first report says)
        self._warm: StepReport | None = None    # warming up: what ran since the engine followed
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
                self.trial, self._trial_wins = None, 0   # an unfinished probe means nothing now
                self.limit, self.reason = self.ceiling, LIGHT
                self._reset_window()
            return self.limit
        self._light_since = None
        if self._counted is None and report.steps > 0:
            self._counted = report.finished is not None
            if self._counted:                   # the start is a change: a pool's first seconds are prefill
                self._changed_at = now
        if self.reason == LIGHT:                # the queue filled again: back to what was learned
            self._set(now, self.base, SETTLED if self.base_rate is not None else STARTING)
            self._changed_at, self._warm = now, None   # the engine was not full: let it fill first
            self._reset_window()
            return self.limit
        if report.steps <= 0 or report.busy_s <= 0:
            return self.limit
        if self._changed_at is not None:
            if not self._followed(report) and now - self._changed_at < 5 * self.window_s:
                return self.limit               # the engine still holds what the old limit let in
            self._changed_at = None
            self._warm = StepReport(finished=0) if self._counted else None
            return self.limit                   # this report straddles the change: skip it too
        if self._warm is not None:              # one turnover at this limit before measuring
            _add(self._warm, report)
            if not self._turned_over(self._warm, 1.0):
                return self.limit
            self._warm = None
            return self.limit
        w = self._window
        _add(w, report)
        if w.busy_s >= self.window_s and w.steps >= self.min_steps and (
                not self._counted or self._turned_over(w, self.turnovers)):
            self._decide(now, w.tokens / w.busy_s)
            self._reset_window()
        return self.limit

    def _turned_over(self, w: StepReport, times: float) -> bool:
        """The batch has turned over ``times`` times: as many requests finished as ran at once
        (the mean over the steps), so the span holds every phase of a request's life, cohorts
        whole; or the span is already ``max_window_s`` long."""
        return (w.finished or 0) >= times * w.running / max(1, w.steps) or w.busy_s >= self.max_window_s

    # -- the policy -----------------------------------------------------------------------------
    def _decide(self, now: float, rate: float) -> None:
        self.windows += 1
        self.last_rate = rate
        if self.trial is None:                  # measured the incumbent
            self.base_rate = rate
            if self.reason == STARTING and self._below_graph_ceiling_next():
                # At the largest CUDA graph: stay, and look below it only after a while.
                self._next_probe = now + self.reprobe_s
                self._set(now, self.base, SETTLED)
                return
            if self.reason == SETTLED and now < self._next_probe:
                return
            self._probe(now)
            return
        margin, confirm = ((self.ceiling_margin, self.ceiling_confirm) if self._below_graph_ceiling_next()
                           else (self.margin, 1))
        if rate > self.base_rate * (1 + margin):          # it pays
            self._trial_wins += 1
            if self._trial_wins < confirm:
                return                          # measure it again before leaving the ceiling
            trial, self.trial, self._trial_wins = self.trial, None, 0
            self.base, self.base_rate, self._won = trial, rate, True   # keep it, go on that way
            self.frac = min(0.25, self.frac * 1.5)
            self._set(now, trial, PROBING)
            self._probe(now)
            return
        self.trial, self._trial_wins = None, 0
        self._tried.add(self.direction)         # it does not: back to the incumbent
        if not self._won and -self.direction not in self._tried:
            self.direction = -self.direction    # measure the incumbent again, then the other side
            self._set(now, self.base, PROBING)
            return
        self._settle(now)

    def _below_graph_ceiling_next(self) -> bool:
        """The incumbent is the largest CUDA graph, and what is (or would be) tried lies below it."""
        return self.graph_ceiling and self.base >= self.ceiling

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
            self._warm = None
            self._reset_window()
        self.limit, self.reason = limit, reason

    def _followed(self, report: StepReport) -> bool:
        """The engine runs about what the limit says (a cut waits for requests to finish)."""
        mean = report.running / report.steps
        return 0.85 * self.limit <= mean <= 1.05 * self.limit + 1

    def _clamp(self, value: int) -> int:
        return max(self.floor, min(self.ceiling, int(value)))

    def _reset_window(self) -> None:
        self._window = StepReport(finished=0)


def _add(into: StepReport, report: StepReport) -> None:
    into.steps += report.steps
    into.tokens += report.tokens
    into.running += report.running
    into.busy_s += report.busy_s
    into.finished = (into.finished or 0) + (report.finished or 0)
