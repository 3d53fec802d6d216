"""What a worker's engine steps do, summed and sent to the dispatcher as STEPS now and then.

The dispatcher's batch limit (``mpdp/routing/batch_limit.py``) needs output tokens per second at
the number of sequences that ran, and how many requests finished (its windows end where the
batch has turned over, so that cohorts that start and finish together are measured whole). Only
the worker sees the steps: it times each one (from the end of the previous step while the engine
stayed busy, so the worker's own work between steps counts, as it does in the throughput a
caller gets), asks the engine what ran (``Engine.step_counts``) and counts the requests that
left with each step. The sums leave at most every ``REPORT_S``: a few small frames a second.
Engines that cannot count (``step_counts`` returns None) send nothing.
"""

from __future__ import annotations

import time

from mpdp.wire import protocol
from mpdp.wire.protocol import Tag

REPORT_S = 0.25


class StepMeter:
    def __init__(self, engine, report_s: float = REPORT_S):
        self.engine = engine
        self.report_s = report_s
        self._last_end: float | None = None     # the end of the previous step, while busy
        self._next_report = time.monotonic() + report_s
        self._reset()

    def _reset(self) -> None:
        self.steps = self.tokens = self.running = self.finished = 0
        self.busy_s = 0.0

    def stepped(self, started: float, finished: int = 0) -> None:
        """One engine step ran from ``started`` (or from the previous step's end) until now, and
        ``finished`` requests left the engine with it."""
        now = time.monotonic()
        counts = self.engine.step_counts()
        begin = self._last_end if self._last_end is not None else started
        self._last_end = now if self.engine.has_unfinished() else None
        if counts is None:
            return
        running, tokens = counts
        self.steps += 1
        self.running += running
        self.tokens += tokens
        self.finished += finished
        self.busy_s += now - begin

    def idle(self) -> None:
        """The loop waited without a step: the next step's time starts afresh."""
        self._last_end = None

    def report(self, sock, now: float) -> None:
        if now < self._next_report:
            return
        self._next_report = now + self.report_s
        if self.steps:
            sock.send_multipart(protocol.encode(Tag.STEPS, {
                "steps": self.steps, "tokens": self.tokens, "running": self.running, "busy_s": self.busy_s,
                "finished": self.finished}))
            self._reset()
