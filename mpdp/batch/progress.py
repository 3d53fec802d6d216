"""Progress on stderr (tqdm) and the closing per-worker table.

The bar moves only in ``advance``, which the writer calls after a batch of lines is in the file:
its count is always the number of lines in the output file (resumed ones included), never
requests that finished but still wait for an earlier one. The closing table is counted from the
same rows, so its total is the summary's count of results this run wrote, never the workers'
own count of requests they finished (which includes results dropped by a stop).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 mininterval: float | None = None):
        from tqdm import tqdm       # imported here: the other subcommands need not pay for it

        stream = stream if stream is not None else sys.stderr
        if mininterval is None:     # a log file gets a line every 10 s, a terminal a live bar
            mininterval = 0.1 if stream.isatty() else 10.0
        self.written, self.tokens, self.failures = initial, 0, 0
        self.by_worker: dict[int, list[int]] = {}     # worker -> [results written, their tokens]
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, unit="req", file=stream, disable=not enabled,
                        mininterval=mininterval, dynamic_ncols=True, smoothing=0.1,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._postfix()

    def advance(self, rows) -> None:
        """``rows`` (output line, completion tokens, worker or None if it failed) are in the file."""
        by_worker, tokens, failures = self.by_worker, 0, 0
        for _, n, worker in rows:
            tokens += n
            if worker is None:
                failures += 1
            else:
                counts = by_worker.get(worker)
                if counts is None:
                    counts = by_worker[worker] = [0, 0]
                counts[0] += 1
                counts[1] += n
        self.written += len(rows)
        self.tokens += tokens
        self.failures += failures
        self._postfix()
        self.bar.update(len(rows))      # redraws (when due) with the postfix set just above

    def _postfix(self) -> None:
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, {self.failures} failed", refresh=False)

    def close(self) -> None:
        self.bar.close()


def worker_table(progress: Progress, stats: dict) -> str:
    """Results this run wrote per worker (a request that failed counts in "failed", whichever
    worker it was on), their completion tokens, and each worker's restarts (``Pool.stats()``)."""
    indexes = sorted({w["index"] for w in stats["workers"]} | set(progress.by_worker))
    restarts = {w["index"]: w["restarts"] for w in stats["workers"]}
    rows = [(str(i), *progress.by_worker.get(i, (0, 0)), restarts.get(i, 0)) for i in indexes]
    if progress.failures:
        rows.append(("failed", progress.failures, 0, "-"))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(restarts.values())))
    head = ("worker", "results", "tokens", "restarts")
    widths = [max(len(head[i]), *(len(f"{r[i]}") for r in rows)) for i in range(4)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  " + "  ".join(f"{v}".rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
