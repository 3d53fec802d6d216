"""mpdp: several GPUs (or CPU workers) as one data-parallel LLM inference pool.

    import mpdp
    with mpdp.Pool(model="smollm2-135m-instruct", engine="hf", num_workers=2) as pool:
        print(pool.submit("What is 2+2?", max_tokens=32, temperature=0.0).result().text)

The front doors and what they share (each builds one ``PoolConfig`` and goes through ``Pool``)::

    front doors   cli.py + cli_args.py (mpdp generate | serve)   batch/   server/
                  integrations/dspy.py (mpdp.dspy)   compat.py (the seed's classes)
    shared rules  config.py (PoolConfig, SAMPLING)   defaults.py (defaults by entry point)
                  openai_api/ (OpenAI bodies, for server/ and batch/)   errors.py
    the pool      pool.py → core/ routing/ wire/ worker/ launch/ engines/

Imports point down: nothing below the front doors imports one (tests/test_front_config.py).
"""

from mpdp.errors import (ContextWindowExceededError, EngineError, MpdpError, PoolBroken, PoolClosed,
                         ProtocolError, RequestTimeout, StreamConsumerFailed, StreamInterrupted, WorkerCrashed,
                         WorkerStartError)
from mpdp.config import DEFAULT_MODEL, TO_CONTEXT, PoolConfig, SamplingParams
from mpdp.pool import Delta, Pool, Stream
from mpdp.requests import Completion
from mpdp.wire.transport import CurveKeys, Transport

__version__ = "0.1.0"

__all__ = ["Pool", "PoolConfig", "SamplingParams", "Stream", "Delta", "Completion", "DEFAULT_MODEL", "TO_CONTEXT", "Transport", "CurveKeys", "MpdpError", "PoolClosed",
           "PoolBroken", "WorkerStartError", "WorkerCrashed", "StreamInterrupted", "StreamConsumerFailed",
           "RequestTimeout", "EngineError",
           "ContextWindowExceededError", "ProtocolError", "vLLMOfflineMultiGPU", "vLLMOffline", "serve", "create_app"]


def __getattr__(name):
    # ``import mpdp`` then ``mpdp.dspy.LM(...)``: the DSPy integration, imported on first use
    # (importing DSPy takes seconds; a pool alone never needs it).
    if name == "dspy":
        import importlib

        return importlib.import_module("mpdp.dspy")
    # The seed's names, imported on first use (they pull in DSPy).
    if name in ("vLLMOfflineMultiGPU", "vLLMOffline"):
        from mpdp import compat
        return getattr(compat, name)
    # The HTTP server, imported on first use (it pulls in FastAPI, uvicorn, prometheus_client).
    if name in ("serve", "create_app"):
        from mpdp import server
        return getattr(server, name)
    raise AttributeError(f"module 'mpdp' has no attribute {name!r}")
