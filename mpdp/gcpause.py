"""Pausing Python's cycle collector around bursts of small, acyclic, long-lived objects.

Building 100k futures, or decoding a frame of 4k results while 100k futures are alive, makes
the collector run every few hundred allocations and walk everything alive each time: that cost
more than the work itself (5x for building futures, measured in bench/overhead.py). Nothing
built in these bursts forms cycles, so pausing loses nothing.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    # Restored only if it was on, so nested or concurrent pauses (the dispatcher thread and a
    # caller thread) always end with it on, and a caller who turned it off keeps it off.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
