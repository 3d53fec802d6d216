"""``mpdp.dspy``: the DSPy integration under a short name.

    import dspy, mpdp.dspy
    lm = mpdp.dspy.LM("smollm2-135m-instruct", engine="hf", num_workers=2)   # nothing starts yet
    dspy.configure(lm=lm)

``mpdp.dspy.LM`` is the recommended class (DSPy 3.4's engine route); ``PoolLM`` is the legacy
``BaseLM`` for DSPy 3.3; ``vLLMOfflineMultiGPU`` / ``vLLMOffline`` are the seed's drop-in names.
``python -m mpdp.dspy multigpu`` runs the seed's example (see ``mpdp/compat.py``).
"""

from mpdp.compat import vLLMOffline, vLLMOfflineMultiGPU
from mpdp.integrations.dspy import (LM, AsyncMpdpEngine, MpdpEngine, PoolHandle, PoolLM, PoolSpec,
                                    split_reasoning)

__all__ = ["LM", "MpdpEngine", "AsyncMpdpEngine", "PoolLM", "PoolSpec", "PoolHandle", "split_reasoning",
           "vLLMOfflineMultiGPU", "vLLMOffline"]

if __name__ == "__main__":
    import sys

    from mpdp.compat import main

    sys.exit(main())
