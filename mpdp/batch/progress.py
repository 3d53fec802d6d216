"""Progress on stderr (tqdm) and the closing per-worker table.

The bar moves only in ``advance``, which the writer calls after a batch of lines is flushed:
its count is always the number of lines in the output file (resumed ones included), never
requests that finished but still wait for an earlier one.
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
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, unit="req", file=stream, disable=not enabled,
                        mininterval=mininterval, dynamic_ncols=True, smoothing=0.1,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._postfix()

    def advance(self, lines: int, tokens: int, failures: int) -> None:
        """``lines`` more are in the file, with ``tokens`` completion tokens and ``failures`` errors."""
        self.written += lines
        self.tokens += tokens
        self.failures += failures
        self._postfix()
        self.bar.update(lines)      # redraws (when due) with the postfix set just above

    def _postfix(self) -> None:
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, {self.failures} failed", refresh=False)

    def close(self) -> None:
        self.bar.close()


def worker_table(stats: dict) -> str:
    """Requests, completion tokens and restarts per worker (``Pool.stats()``), with totals."""
    rows = [(str(w["index"]), w["requests"], w["tokens"], w["restarts"]) for w in stats["workers"]]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    head = ("worker", "requests", "tokens", "restarts")
    widths = [max(len(head[i]), *(len(f"{r[i]}") for r in rows)) for i in range(4)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  " + "  ".join(f"{v}".rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
