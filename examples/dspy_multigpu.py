"""The seed's multi-GPU example on an mpdp pool (also ``python -m mpdp.dspy multigpu``).

    python examples/dspy_multigpu.py                       # vLLM on every visible GPU, else hf on CPU
    python examples/dspy_multigpu.py --engine hf --num-questions 6

A batch of sums through ``batch_generate`` (one pool call, spread over the workers), then
``dspy.ChainOfThought("question -> answer")`` on small arithmetic questions through
``dspy.Evaluate``, with ``dspy.JSONAdapter()`` by default: the engine enforces the signature's
JSON schema while decoding (vLLM's structured outputs, xgrammar on hf), so answers parse even
from the embedded 135M model. Prints the score; ends with exit code 0 and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from typing import Any

import dspy

from mpdp.compat import vLLMOfflineMultiGPU


def first_int(text: Any) -> int | None:
    match = re.search(r"-?\d+", str(text or "").replace(",", ""))
    return int(match.group()) if match else None


def questions(count: int, on_gpu: bool) -> list[dspy.Example]:
    """The seed's a*b+a on GPU; one-digit sums on CPU, which a 135M model can sometimes do."""
    out = []
    for i in range(count):
        a, b = i % 9 + 2, i % 7 + 3
        q, answer = (f"What is {a} * {b} + {a}?", a * b + a) if on_gpu else (f"What is {a} + {b}?", a + b)
        out.append(dspy.Example(question=q, answer=str(answer)).with_inputs("question"))
    return out


def metric(example, prediction, trace=None) -> bool:
    return first_int(getattr(prediction, "answer", None)) == int(example.answer)


def run(args) -> float:
    # Only what was given: the rest are the seed classes' defaults for the engine.
    sampling = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
                if v is not None}
    lm = vLLMOfflineMultiGPU(model=args.model, num_gpus=args.num_gpus, engine=args.engine,
                             num_workers=args.num_workers, cache=False, **sampling)
    try:
        return _run(lm, args)
    finally:
        lm.shutdown()


def _run(lm, args) -> float:
    print(f"configuration: {lm.inspect()}")
    lm.pool                                      # start the workers before the clock runs
    prompts = [f"What is {i} + {i + 1}? Answer with the number only." for i in range(args.num_prompts)]
    start = time.monotonic()
    results = lm.batch_generate(prompts, max_tokens=16, temperature=0.0)
    seconds = time.monotonic() - start
    print(f"\nbatch_generate: {len(prompts)} prompts in {seconds:.2f} s ({len(prompts) / seconds:.1f}/s)")
    for prompt, answer in list(zip(prompts, results))[:5]:
        print(f"  {prompt} -> {answer.strip()[:50]!r}")

    devset = questions(args.num_questions, args.on_gpu)
    adapter = dspy.JSONAdapter() if args.adapter == "json" else dspy.ChatAdapter()
    # A small model may still fail a call (a chain of thought cut by max_tokens): count it, and
    # keep its traceback out of the output, which is for the score.
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=args.threads, display_progress=False,
                             max_errors=len(devset) + 1, provide_traceback=False)
    start = time.monotonic()
    with dspy.context(lm=lm, adapter=adapter):
        result = evaluate(dspy.ChainOfThought("question -> answer"))
    seconds = time.monotonic() - start
    failed = sum(1 for _, prediction, _ in result.results if "answer" not in prediction)
    print(f"\nChainOfThought ({args.adapter} adapter) on {len(devset)} questions: score {result.score:.1f}, "
          f"{failed} failed calls, {seconds:.1f} s")
    print(f"pool: {lm.inspect().get('workers')}")
    return result.score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpdp.dspy multigpu",
        description="The seed's multi-GPU example on an mpdp pool: a batch of sums through batch_generate, "
                    "then dspy.ChainOfThought on small math questions through dspy.Evaluate.")
    parser.add_argument("example", nargs="?", default="multigpu", choices=["multigpu"])
    parser.add_argument("--model", default=None, help="model folder or name (default: $MPDP_MODEL, "
                        "$VLLM_MODEL_PATH, or the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--engine", default=None, choices=["vllm", "hf", "echo"],
                        help="default: vllm with a GPU, else hf")
    parser.add_argument("--num-gpus", type=int, default=None, help="default: every visible GPU (on CPU: 2 workers)")
    parser.add_argument("--num-workers", type=int, default=None, help="CPU workers (hf/echo)")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 100 on GPU, 8 on CPU")
    parser.add_argument("--num-questions", type=int, default=None, help="default: 50 on GPU, 6 on CPU")
    parser.add_argument("--threads", type=int, default=80)
    parser.add_argument("--adapter", choices=["json", "chat"], default="json")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="default: the LM's own (2048 on GPU, 256 on CPU)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the LM's own (0.6 on GPU, greedy on CPU)")
    args = parser.parse_args(argv)

    from mpdp.pool import default_engine
    from mpdp.launch.local import visible_gpus

    args.on_gpu = (args.engine or default_engine()) == "vllm"
    args.num_gpus = args.num_gpus or (len(visible_gpus()) if args.on_gpu else 2)
    args.num_prompts = args.num_prompts or (100 if args.on_gpu else 8)
    args.num_questions = args.num_questions or (50 if args.on_gpu else 6)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mpdp").setLevel(logging.INFO)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
