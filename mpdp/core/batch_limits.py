"""Each worker's batch limit, and the notice when the callers cannot fill the engines.

The dispatcher owns one ``BatchLimits``. A worker's credit in the scheduler (how many requests
its engine holds; the rest wait in the pool's queue, in order) is:

- ``off``: what the worker advertised in READY (vLLM: ``max_num_seqs`` plus a margin);
- a fixed int: that many;
- ``adaptive``: a ``BatchLimit`` controller per worker (``mpdp/routing/batch_limit.py``), fed
  by the worker's STEPS reports and by whether requests were waiting. Its range is
  [ceiling / 8, ceiling], the ceiling being the advertised credit or, for vLLM with CUDA graphs,
  the largest captured graph (a larger decode batch runs without one, each step prepared on
  the CPU: the knee that vLLM's default ``max_num_seqs`` of 1024 lies past on an H100/H200).
  A graph ceiling is where the controller starts and what it leaves only on clear evidence.

Routing, streaming and recovery see only a credit that moves: a lowered credit sends nothing
new to that worker until it holds less; nothing in flight is touched.

Underfill: callers that keep few requests in flight (a DSPy ``Evaluate`` with 80 threads on
4 GPUs gives 20 sequences a GPU) leave the engines mostly idle, however many GPUs there are.
Once the pool has been busy for ``underfill_after_s`` with nothing ever waiting and on average
less than a quarter of the credits in use, it says so once in the log, with what would fill
them, and keeps it in ``stats()["underfill"]`` (``/metrics``: ``mpdp:pool_underfilled``).
"""

from __future__ import annotations

import logging
from typing import Any

from mpdp.config import check_batch_limit
from mpdp.routing.batch_limit import FIXED, OFF, BatchLimit, StepReport

log = logging.getLogger("mpdp")


def resolve(setting, engine_cls) -> str | int:
    """``batch_limit`` for this engine: "auto" is the engine's own default (on where it measured a gain)."""
    setting = check_batch_limit(setting)
    return engine_cls.batch_limit_default if setting == "auto" else setting


class _Worker:
    __slots__ = ("advertised", "ceiling", "credit", "reason", "controller", "hint")

    def __init__(self, advertised: int, hint: int | None):
        self.advertised = advertised
        self.hint = hint
        self.ceiling = min(advertised, hint) if hint else advertised
        self.credit = advertised
        self.reason = OFF
        self.controller: BatchLimit | None = None


class BatchLimits:
    def __init__(self, setting: str | int = "off", *, underfill_after_s: float = 30.0, **controller_options):
        self.setting = check_batch_limit(setting)
        if self.setting == "auto":
            raise ValueError("resolve batch_limit='auto' for the engine first (Engine.batch_limit_default)")
        self.options = controller_options
        self.workers: dict[int, _Worker] = {}
        self.underfill_after_s = underfill_after_s
        self._busy_s = 0.0
        self._in_flight_s = 0.0                  # in-flight requests x seconds while busy
        self._credit_s = 0.0
        self._last_tick: float | None = None
        self.underfill: dict | None = None       # set once, when the notice is given

    # -- workers ---------------------------------------------------------------------------------
    def worker_ready(self, index: int, advertised: int, extra: dict | None) -> int:
        """A worker is READY: the credit the scheduler gives it."""
        hint = (extra or {}).get("graph_max")
        w = self.workers[index] = _Worker(advertised, hint if isinstance(hint, int) and hint > 0 else None)
        self._apply(w)
        return w.credit

    def worker_gone(self, index: int) -> None:
        self.workers.pop(index, None)

    def steps(self, index: int, body: dict, saturated: bool, now: float) -> int | None:
        """A STEPS report; the worker's new credit when it changes, else None."""
        w = self.workers.get(index)
        if w is None or w.controller is None:
            return None
        report = StepReport(body["steps"], body["tokens"], body["running"], float(body["busy_s"]), body["finished"])
        credit = w.controller.observe(now, report, saturated)
        w.reason = w.controller.reason
        if credit == w.credit:
            return None
        w.credit = credit
        return credit

    def set(self, setting: str | int) -> dict[int, int]:
        """Change the setting at run time; the new credit of every worker."""
        setting = check_batch_limit(setting)
        if setting == "auto":
            raise ValueError("resolve batch_limit='auto' for the engine first")
        self.setting = setting
        for w in self.workers.values():
            self._apply(w)
        return {i: w.credit for i, w in self.workers.items()}

    def _apply(self, w: _Worker) -> None:
        if self.setting == "off":
            w.controller, w.credit, w.reason = None, w.advertised, OFF
        elif isinstance(self.setting, int):
            w.controller, w.credit, w.reason = None, self.setting, FIXED
        else:
            # A ceiling below the advertised credit is the largest CUDA graph: start there, and
            # leave it only on clear evidence (see the controller).
            graph = w.hint is not None and w.hint < w.advertised
            w.controller = BatchLimit(w.ceiling, **{"graph_ceiling": graph, **self.options})
            w.credit, w.reason = w.controller.limit, w.controller.reason

    def describe(self, index: int) -> dict:
        w = self.workers.get(index)
        if w is None:
            return {}
        out = {"batch_limit": w.credit, "batch_limit_reason": w.reason}
        c = w.controller
        if c is not None:
            out["batch_limit_ceiling"] = c.ceiling
            if c.last_rate is not None:
                out["batch_limit_tokens_s"] = round(c.last_rate, 1)
        return out

    # -- underfill ---------------------------------------------------------------------------------
    def tick(self, now: float, pending: int, waiting: int, in_flight: int) -> dict[int, int]:
        """Called as stats are published. An idle engine sends no STEPS: its controller learns
        here that nothing waits (light load). Returns the credits that changed."""
        changed = {}
        if not waiting:
            for index, w in self.workers.items():
                if w.controller is not None:
                    credit = w.controller.observe(now, StepReport(), saturated=False)
                    w.reason = w.controller.reason
                    if credit != w.credit:
                        changed[index] = w.credit = credit
        self._underfill(now, pending, waiting, in_flight)
        return changed

    def _underfill(self, now: float, pending: int, waiting: int, in_flight: int) -> None:
        """Accumulate while the pool is busy and nothing waits; say it once."""
        last, self._last_tick = self._last_tick, now
        if last is None or self.underfill is not None or not self.workers:
            return
        dt = min(now - last, 1.0)
        if pending <= 0:
            return
        if waiting > 0:                          # the engines had more than they took: not underfilled
            self._busy_s = self._in_flight_s = self._credit_s = 0.0
            return
        credits = sum(w.ceiling if w.controller is not None else w.credit for w in self.workers.values())
        self._busy_s += dt
        self._in_flight_s += in_flight * dt
        self._credit_s += credits * dt
        if self._busy_s < self.underfill_after_s:
            return
        mean, fill = self._in_flight_s / self._busy_s, self._credit_s / self._busy_s
        if mean < fill / 4:
            n = len(self.workers)
            advice = (f"the callers keep about {mean:.0f} requests in flight ({mean / n:.0f} per worker) while "
                      f"the {n} engine{'s' if n > 1 else ''} could run {fill:.0f} at once: most of their "
                      f"capacity sits idle. Send more at once: more client threads (dspy num_threads, "
                      f"concurrent HTTP clients), or Pool.generate / agenerate / submit for a whole list")
            self.underfill = {"mean_in_flight": round(mean, 1), "fill": round(fill), "advice": advice}
            log.warning("mpdp: %s", advice)
        self._busy_s = self._in_flight_s = self._credit_s = 0.0
