"""DSPy on the CPU engine, and what grammar masking costs: one run, one machine.

    python -m bench.dspy_cpu [--json out.json]

1. The 20-question capital-city evaluation of ``examples/dspy_capitals.py`` (``dspy.Predict``,
   ``Evaluate(num_threads=16)``, the embedded SmolLM2-135M-Instruct on 2 hf workers, the LM's CPU
   defaults: greedy, 256 tokens), with ChatAdapter (without and with its JSON fallback, which now
   gets structured output) and with JSONAdapter + structured output, zero-shot and with two demos.
2. The hf engine alone (one engine in this process, 16 rows, greedy): seconds per generated token
   with a ``json_schema`` response_format against the same prompts unconstrained, and the time
   spent filling and applying the grammar's token masks, measured inside the same steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("dspy_capitals", REPO / "examples" / "dspy_capitals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dspy_rows(threads: int) -> list[dict]:
    import dspy

    import mpdp.dspy

    example = _example()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    devset = example.load_devset()
    variants = [("chat, no JSON fallback", "chat", dspy.ChatAdapter(use_json_adapter_fallback=False)),
                ("chat (JSON fallback structured)", "chat", dspy.ChatAdapter()),
                ("json + structured output", "json", dspy.JSONAdapter())]
    rows = []
    lm = mpdp.dspy.LM(engine="hf", num_workers=2)
    try:
        lm.pool                                          # workers up before any clock runs
        for demos in (0, 2):
            for label, name, adapter in variants:
                dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)   # no replays
                row = example.evaluate(lm, name, devset, threads=threads, demos=demos, adapter=adapter)
                row["variant"] = label
                rows.append(row)
                print(f"  {label:34s} demos {demos}: score {row['score']:5.1f} ({row['correct']}/20), "
                      f"{row['parse_errors']:2d} parse errors, {row['seconds']:6.1f} s", flush=True)
    finally:
        lm.close()
    return rows


# An answer that cannot end within max_tokens (at least 100 list items): every constrained row
# decodes exactly as many tokens as the unconstrained ones (ignore_eos), so both runs have the same
# batch shapes step by step and the difference is the grammar's work alone.
SCHEMA = {"type": "object", "properties": {
    "hobbies": {"type": "array", "items": {"type": "string"}, "minItems": 100}}, "required": ["hobbies"]}
ASKS = ["Describe a person as JSON.", "Invent a character for a story.", "Who is your favourite author?",
        "Give me a profile of a sailor.", "Tell me about a scientist.", "Describe a chef.",
        "Describe a student from Spain.", "Write about a musician."]


def masking_rows(tokens: int, repeats: int) -> dict:
    """Seconds per generated token, constrained against unconstrained, and the mask's own share."""
    from mpdp.engines.base import EngineRequest, WorkerPlacement
    from mpdp.engines.hf import HFEngine, _Grammars
    from mpdp.models import resolve_model

    engine = HFEngine(resolve_model("smollm2-135m-instruct"), {"max_batch_size": 16},
                      WorkerPlacement(0, num_threads=os.cpu_count() or 1))
    mask_seconds = [0.0]
    original = _Grammars.mask

    def timed_mask(self, rows, logits):
        start = time.perf_counter()
        original(self, rows, logits)
        mask_seconds[0] += time.perf_counter() - start

    _Grammars.mask = timed_mask
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}

    def run(constrained: bool) -> tuple[float, int]:
        params = {"temperature": 0, "max_tokens": tokens, "n": 2}
        if constrained:
            params["response_format"] = fmt
        else:
            params["ignore_eos"] = True      # as many tokens as the constrained rows, or more
        for i, ask in enumerate(ASKS):
            engine.add(EngineRequest(id=i, messages=[{"role": "user", "content": ask}], params=dict(params)))
        start, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += sum(r.completion_tokens for r in engine.step())
        return time.perf_counter() - start, produced

    run(True)                                # warm-up: compiles the grammar, builds the tokenizer table
    out = {"plain": [], "json": []}
    try:
        for _ in range(repeats):
            for kind in ("plain", "json"):
                mask_seconds[0] = 0.0
                seconds, produced = run(kind == "json")
                out[kind].append({"seconds": seconds, "tokens": produced, "mask_seconds": mask_seconds[0]})
    finally:
        _Grammars.mask = original
        engine.close()

    def per_token(kind, key="seconds"):
        runs = out[kind]
        return sum(r[key] for r in runs) / sum(r["tokens"] for r in runs)

    result = {"rows": 16, "max_tokens": tokens, "repeats": repeats, "runs": out,
              "plain_s_per_token": per_token("plain"), "json_s_per_token": per_token("json"),
              "mask_s_per_token": per_token("json", "mask_seconds")}
    result["ratio"] = result["json_s_per_token"] / result["plain_s_per_token"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--mask-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--only", choices=["dspy", "masking"], default=None)
    args = parser.parse_args(argv)
    evaluation = masking = None
    if args.only != "masking":
        print("DSPy evaluation (20 questions, Evaluate(num_threads=%d)):" % args.threads, flush=True)
        evaluation = dspy_rows(args.threads)
    if args.only == "dspy":
        return _write(args, argv, evaluation, masking)
    print("grammar masking on the hf engine:", flush=True)
    masking = masking_rows(args.mask_tokens, args.repeats)
    print(f"  unconstrained {masking['plain_s_per_token'] * 1e3:.2f} ms/token, json_schema "
          f"{masking['json_s_per_token'] * 1e3:.2f} ms/token (x{masking['ratio']:.3f}); mask alone "
          f"{masking['mask_s_per_token'] * 1e3:.3f} ms/token", flush=True)
    return _write(args, argv, evaluation, masking)


def _write(args, argv, evaluation, masking) -> int:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{os.cpu_count()}-core CPU", "python": platform.python_version(),
                       "command": "python " + " ".join(["bench/dspy_cpu.py", *(argv or sys.argv[1:])]),
                       "evaluation": evaluation, "masking": masking}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
