"""Sampling defaults by entry point: one table, read by every front door and quoted by the README.

Each door fills the sampling fields a request leaves out with its row's values; a field a row
does not name is left to the engine (vLLM takes the model's ``generation_config.json``, then
vLLM's ``SamplingParams`` defaults: temperature 1.0, max_tokens 16, top_p 1.0; the hf and echo
engines use the same numbers). A value given, at any level, is always kept.
``python -m mpdp.defaults`` prints the table as the README shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpdp.config import TO_CONTEXT

SHOWN = ("temperature", "max_tokens", "top_p")   # the README's columns


@dataclass(frozen=True, slots=True)
class Row:
    door: str                                   # as the README names it
    values: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def describe(self, name: str) -> str:
        if name not in self.values:
            return "engine's"
        value = self.values[name]
        return "up to the context" if value == TO_CONTEXT else str(value)


DOORS: dict[str, Row] = {
    "pool": Row("`mpdp.Pool` (`submit`, `stream`, `generate`, `imap`)", {},
                "vLLM's `SamplingParams` defaults, so code moved from `vllm.LLM` behaves the same; set "
                "pool-level defaults with `Pool(..., temperature=, max_tokens=)`"),
    "generate": Row("CLI `mpdp generate`", {"temperature": 0.0, "max_tokens": 256},
                    "a batch job: reproducible output, answers of a few paragraphs"),
    "serve_chat": Row("`mpdp serve`, `/v1/chat/completions`", {"max_tokens": TO_CONTEXT},
                      "as OpenAI's API and `vllm serve`: the official `openai` client leaves `max_tokens` "
                      "out, and the answer ends at EOS (`finish_reason` \"stop\") or the context, never "
                      "after 16 tokens; `--max-tokens N` sets another default"),
    "serve_completions": Row("`mpdp serve`, `/v1/completions`", {},
                             "OpenAI's and `vllm serve`'s legacy completions default (16 tokens)"),
    "dspy_hf": Row("`mpdp.dspy.LM` / `PoolLM`, `hf` engine (CPU)", {"temperature": 0.0, "max_tokens": 256},
                   "the 135M model sampled at 1.0 wanders off DSPy's format and often never ends, so each "
                   "call ran to `max_tokens` (2,048: ~140 s a call on 2 cores); greedy answers are also "
                   "what DSPy's cache can reuse, and 256 tokens hold an answer or a short chain of thought"),
    "dspy": Row("`mpdp.dspy.LM` / `PoolLM`, `vllm` (and `echo`)", {"max_tokens": 2048},
                "room for reasoning models, which write long `<think>` blocks; their recommended sampling "
                "lives in the model's generation config, which the engine applies"),
    "seed": Row("`vLLMOfflineMultiGPU`, `vLLMOffline` on vLLM", {"temperature": 0.6, "max_tokens": 2048,
                                                                "top_p": 0.95},
                "the seed's own values, for drop-in compatibility"),
    "seed_hf": Row("`vLLMOfflineMultiGPU`, `vLLMOffline` on the CPU fallback",
                   {"temperature": 0.0, "max_tokens": 256}, "as `mpdp.dspy.LM` on hf"),
}


def door_defaults(door: str) -> Row:
    try:
        return DOORS[door]
    except KeyError:
        raise ValueError(f"unknown entry point {door!r}; known: {', '.join(DOORS)}") from None


def sampling_defaults(door: str) -> dict[str, Any]:
    """The sampling values this door fills in (the fields it leaves to the engine are absent)."""
    return dict(door_defaults(door).values)


def markdown() -> str:
    """The table as the README quotes it."""
    lines = ["| entry point | " + " | ".join(SHOWN) + " | why |", "|---|" + "---|" * len(SHOWN) + "---|"]
    for row in DOORS.values():
        lines.append(f"| {row.door} | " + " | ".join(row.describe(n) for n in SHOWN) + f" | {row.why} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
