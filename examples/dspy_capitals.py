"""A DSPy program on the CPU: capital cities with the embedded SmolLM2-135M-Instruct.

    python examples/dspy_capitals.py                     # JSONAdapter + structured output
    python examples/dspy_capitals.py --adapter chat      # DSPy's default ChatAdapter

``dspy.Predict("question -> answer")`` with two labelled demos (``dspy.LabeledFewShot``) over the
20 questions of ``capitals.jsonl`` through ``dspy.Evaluate``, on an mpdp pool of ``hf`` workers.
With ``dspy.JSONAdapter()`` DSPy sends the signature's JSON schema as ``response_format`` and the
hf engine enforces it while decoding (xgrammar), so every answer parses even from a 135M model
that never writes ChatAdapter's ``[[ ## answer ## ]]`` fields on its own. The demos matter for
the score: without them (``--demos 0``) the model copies the ``{answer}`` placeholder of DSPy's
format description into every answer. Well under a minute on 2 cores once the workers are up.
Prints the score, the number of calls DSPy could not parse, and the time.
"""

from __future__ import annotations

import argparse
import json
import time
import unicodedata
from pathlib import Path

import dspy

import mpdp.dspy

QUESTIONS = Path(__file__).with_name("capitals.jsonl")
# Demos from outside the evaluation set: they show the model what an answer looks like.
TRAIN = [("Peru", "Lima"), ("Austria", "Vienna")]


def load_devset(path: Path = QUESTIONS) -> list[dspy.Example]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [dspy.Example(**row).with_inputs("question") for row in rows]


def _plain(text: str) -> str:
    """Lower case without accents: "Brasília" and "Brasilia" are the same answer."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def make_program(demos: int = 2):
    program = dspy.Predict("question -> answer")
    if not demos:
        return program
    trainset = [dspy.Example(question=f"What is the capital of {country}?", answer=city).with_inputs("question")
                for country, city in TRAIN[:demos]]
    return dspy.LabeledFewShot(k=demos).compile(program, trainset=trainset, sample=False)


def metric(example, prediction, trace=None) -> bool:
    return _plain(example.answer) in _plain(getattr(prediction, "answer", "") or "")


def make_adapter(name: str):
    return dspy.JSONAdapter() if name == "json" else dspy.ChatAdapter()


def evaluate(lm, adapter_name: str, devset: list[dspy.Example], threads: int = 16, demos: int = 2,
             adapter=None) -> dict:
    """Score, calls that failed (DSPy could not parse the answer) and wall time of one evaluation."""
    program = make_program(demos)
    # Failures are counted below; their tracebacks would only hide the score.
    evaluator = dspy.Evaluate(devset=devset, metric=metric, num_threads=threads, display_progress=False,
                              max_errors=len(devset) + 1, provide_traceback=False)
    start = time.monotonic()
    with dspy.context(lm=lm, adapter=adapter or make_adapter(adapter_name)):
        result = evaluator(program)
    seconds = time.monotonic() - start
    failed = sum(1 for _, prediction, _ in result.results if "answer" not in prediction)
    correct = sum(1 for _, _, score in result.results if score)
    return {"adapter": adapter_name, "demos": demos, "score": float(result.score), "correct": correct, "total": len(devset),
            "parse_errors": failed, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", choices=["json", "chat"], default="json")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--demos", type=int, default=2, choices=range(len(TRAIN) + 1))
    args = parser.parse_args(argv)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)   # measure, do not replay
    # The DSPy defaults on the hf engine: greedy, 256 tokens (see the README's defaults table).
    lm = mpdp.dspy.LM(engine="hf", num_workers=args.num_workers)
    try:
        lm.pool                                  # start the workers before the clock runs
        out = evaluate(lm, args.adapter, load_devset(), args.threads, args.demos)
    finally:
        lm.close()
    print(f"dspy.Predict ({out['demos']} demos) with the {out['adapter']} adapter on {out['total']} "
          f"capital-city questions: "
          f"score {out['score']:.1f} ({out['correct']}/{out['total']}), {out['parse_errors']} parse errors, "
          f"{out['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
