"""``mpdp.dspy``: the DSPy integration under a short name.

    import dspy, mpdp
    lm = mpdp.dspy.LM("smollm2-135m-instruct", engine="hf", num_workers=2)   # nothing starts yet
    dspy.configure(lm=lm)

``mpdp.dspy.LM`` is the recommended class (DSPy 3.4's engine route); ``PoolLM`` is the legacy
``BaseLM`` for DSPy 3.3; ``vLLMOfflineMultiGPU`` / ``vLLMOffline`` are the seed's drop-in names.
``python -m mpdp.dspy multigpu`` runs the seed's example, ``examples/dspy_multigpu.py`` of a
source checkout.
"""

from mpdp.compat import vLLMOffline, vLLMOfflineMultiGPU
from mpdp.config import PoolConfig
from mpdp.integrations.dspy import (LM, AsyncMpdpEngine, MpdpEngine, PoolHandle, PoolLM, dspy_defaults,
                                    split_reasoning)

__all__ = ["LM", "MpdpEngine", "AsyncMpdpEngine", "PoolLM", "PoolConfig", "PoolHandle", "split_reasoning",
           "dspy_defaults", "vLLMOfflineMultiGPU", "vLLMOffline"]


def _run_example() -> int:
    """The demo is an example, not library code: run the checkout's examples/dspy_multigpu.py."""
    import runpy
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "dspy_multigpu.py"
    if not example.is_file():
        print(f"the example is not installed with the package: run examples/dspy_multigpu.py from a "
              f"source checkout of mpdp (looked for {example.name} beside the package)", file=sys.stderr)
        return 2
    return runpy.run_path(str(example), run_name="mpdp_example")["main"](sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(_run_example())
