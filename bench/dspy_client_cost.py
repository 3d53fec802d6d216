#!/usr/bin/env python3
"""How many LM calls per second can one DSPy process drive? DSPy's own CPU per call, no engine.

    python -m bench.dspy_client_cost --questions 2000 --threads 1,80,4096

Runs the ``bench/dspy_eval.py`` program (ChainOfThought over synthetic sums) under
``dspy.Evaluate`` against an engine that answers at once with ~2,000 characters of random text
(what dummy weights say), so all the time measured is DSPy's (adapters, parsing, history,
callbacks, Evaluate's threads) and none is a model's. Every DSPy program shares this ceiling:
a pool behind it can deliver at most this many calls a second to the caller, whatever the GPUs do.
Both adapters of ``dspy_eval.py`` are measured (``chat``: one call a question; ``chat+json``: DSPy's
default, a second JSON-mode call when the first answer does not parse, which is every time here).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time

import dspy

from bench.dspy_eval import make_adapter, make_devset, metric
from mpdp.integrations.dspy import completion_response
from mpdp.requests import Completion

_ALPHABET = ("abcdefghijklmnopqrstuvwxyz 的是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于"
             "就下得可你年生会自后过[]{}\":,.0123456789")


class InstantGarbage:
    """A DSPy 3.4 engine (complete/stream/close) that answers every request at once."""

    def __init__(self, chars: int, seed: int = 0):
        self.chars, self.rng = chars, random.Random(seed)

    def complete(self, request):
        text = "".join(self.rng.choice(_ALPHABET) for _ in range(self.chars))
        completion = Completion(text=text, finish_reason="length", prompt_tokens=300, completion_tokens=512,
                                worker=0, choices=[text], finish_reasons=["length"])
        return completion_response(completion, "instant-garbage", keep_reasoning=False)

    def stream(self, request):
        raise NotImplementedError

    def close(self):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--threads", default="1,80,4096")
    p.add_argument("--chars", type=int, default=2000, help="characters in each answer")
    p.add_argument("--adapters", default="chat,chat+json")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    logging.getLogger("dspy").setLevel(logging.CRITICAL)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    lm = dspy.LM("instant-garbage", engine=InstantGarbage(args.chars), cache=False,
                 max_tokens=512, temperature=0.6)
    program = dspy.ChainOfThought("question -> answer")
    devset = make_devset(args.questions)
    rows = []
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, DSPy {dspy.__version__}")
    print("| adapter | threads | questions | LM calls | wall s | calls/s | CPU ms/call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for adapter in args.adapters.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            evaluator = dspy.Evaluate(devset=devset, metric=metric, num_threads=threads,
                                      display_progress=False, max_errors=10**9, provide_traceback=False)
            calls0 = len(lm.history)
            with dspy.context(lm=lm, adapter=make_adapter(adapter)):
                t0, c0 = time.perf_counter(), time.process_time()
                evaluator(program)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            calls = len(lm.history) - calls0
            if not calls:
                raise SystemExit("no LM call was recorded: the engine failed (run one question by hand)")
            row = {"adapter": adapter, "threads": threads, "questions": len(devset), "calls": calls,
                   "wall_s": wall, "calls_per_s": calls / wall, "cpu_ms_per_call": cpu / calls * 1e3}
            rows.append(row)
            print(f"| {adapter} | {threads} | {len(devset)} | {calls} | {wall:.2f} | "
                  f"{row['calls_per_s']:.0f} | {row['cpu_ms_per_call']:.2f} |", flush=True)
            del lm.history[:]                       # the LM keeps every call: don't let it pile up
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
