"""A slow worker is not a hung one: a DSPy program on a busy machine, counting false kills.

    python -m bench.liveness [--busy 6] [--questions 6] [--engine hf] [--json out.json]

Starts ``--busy`` processes that spin (``python -c "while True: pass"``, at this process's nice
level, as a compile beside a laptop's notebook would), then runs a DSPy program through
``mpdp.dspy.LM`` on one worker with the pool's default liveness settings: ``dspy.JSONAdapter``
(structured output: the first request compiles its grammar) over ``--questions`` questions,
one after another, each a fresh prompt. It reports what a user would see (answers, failures)
and what the pool saw: restarts (each a worker killed: with a live, progressing worker every
one is a false kill), the longest gap between two heartbeats the dispatcher received, and the
longest engine call the heartbeats reported. ``--engine echo`` runs the same loop of plain
requests on the echo engine (no DSPy) for 30 s, to look at heartbeat gaps alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "How many legs has a spider?",
             "What colour is the sky on a clear day?", "What is 12 times 12?", "Who wrote Hamlet?",
             "What is the largest planet of the solar system?", "What is the boiling point of water in Celsius?",
             "What is the chemical symbol of gold?", "How many days has a leap year?"]


class Gaps:
    """Heartbeats as the dispatcher receives them (its own method wrapped, in this process)."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}
        self.max_gap = 0.0
        self.max_busy = 0.0
        self.beats = 0

    def install(self) -> bool:
        from mpdp.core.dispatcher import Dispatcher

        original = getattr(Dispatcher, "_on_heartbeat", None)
        if original is None:               # a version without progress in its heartbeats
            return False
        gaps = self

        def on_heartbeat(dispatcher, slot, beat, now):
            key = (slot.index, slot.incarnation)
            if key in gaps.last:
                gaps.max_gap = max(gaps.max_gap, now - gaps.last[key])
            gaps.last[key] = now
            gaps.beats += 1
            gaps.max_busy = max(gaps.max_busy, beat.busy_s)
            return original(dispatcher, slot, beat, now)

        Dispatcher._on_heartbeat = on_heartbeat
        return True


def spin(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_dspy(pool, questions: list[str]) -> list[dict]:
    import dspy

    import mpdp.dspy

    lm = mpdp.dspy.LM(pool=pool, cache=False)
    predict = dspy.Predict("question -> answer: str")
    rows = []
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for q in questions:
            t = time.monotonic()
            try:
                answer, error = predict(question=q).answer, None
            except Exception as exc:           # what the user would see; the bench goes on
                answer, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append({"question": q, "answer": answer, "error": error, "seconds": round(time.monotonic() - t, 1)})
            print(f"  {rows[-1]['seconds']:6.1f} s  {q!r} -> {answer!r}" + (f"  FAILED {error}" if error else ""),
                  flush=True)
    return rows


def run_echo(pool, questions: list[str], seconds: float = 30.0) -> list[dict]:
    """Batches of plain requests for ``seconds``: the heartbeats' gaps with a busy dispatcher."""
    rows = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for q in questions:
            t = time.monotonic()
            text = pool.generate([q] * 2000)[0].text
            rows.append({"question": q, "answer": text, "error": None, "seconds": round(time.monotonic() - t, 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=6, help="spinning processes beside the pool")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--engine", default="hf", choices=("hf", "echo"))
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)

    import mpdp

    gaps = Gaps()
    measured = gaps.install()
    questions = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else "")
                 for i in range(args.questions)]
    busy = spin(args.busy)
    started = time.monotonic()
    try:
        with mpdp.Pool(engine=args.engine, num_workers=1) as pool:
            settings = {k: getattr(pool._dispatcher, k) for k in ("heartbeat_interval", "heartbeat_timeout")}
            settings["step_timeout"] = pool.stats()["workers"][0].get("step_timeout")
            print(f"{args.busy} busy processes, nice {os.nice(0)}, {os.cpu_count()} cores; {args.engine} "
                  f"worker ready after {time.monotonic() - started:.0f} s; {settings}", flush=True)
            rows = (run_dspy if args.engine == "hf" else run_echo)(pool, questions)
            load = os.getloadavg()[0]
            workers = pool.stats()["workers"]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    result = {
        "engine": args.engine, "busy": args.busy, "nice": os.nice(0), "cores": os.cpu_count(),
        "load_1min": round(load, 1), "settings": settings, "questions": len(rows),
        "failed": sum(r["error"] is not None for r in rows),
        "restarts": sum(w["restarts"] for w in workers),
        "max_heartbeat_gap_s": round(gaps.max_gap, 3) if measured else None,
        "max_engine_call_s": round(gaps.max_busy, 3) if measured else None,
        "heartbeats": gaps.beats if measured else None,
        "seconds": round(time.monotonic() - started, 1), "python": platform.python_version(), "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
