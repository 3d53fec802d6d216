"""The seed's API on an mpdp pool: change one import, keep the rest of the code.

    # before: from vllm_dspy_adapter import vLLMOfflineMultiGPU
    from mpdp.compat import vLLMOfflineMultiGPU        # or: from mpdp import vLLMOfflineMultiGPU

    lm = vLLMOfflineMultiGPU(model="/models/Qwen3-8B", num_gpus=4, temperature=0.6, max_tokens=2048)
    dspy.configure(lm=lm)                                # a dspy.LM: Predict, Evaluate, GEPA as before
    lm("What is 2+2?")                                   # ['4']
    lm.batch_generate(prompts, max_tokens=100)           # strings, in input order

Both classes are :class:`mpdp.integrations.dspy.LM` (a ``dspy.LM``), so DSPy's cache, retries,
history and usage tracking apply to ``lm(...)`` and to programs; ``batch_generate`` goes straight
to the pool. When ``engine`` is not given it is "vllm" where vLLM is installed and a GPU is
visible, else "hf" on the CPU with one worker per requested GPU (at most one per core). As with
every mpdp LM, no worker starts before the first call.

Defaults (the README's table): on vLLM the seed's own, temperature 0.6, top_p 0.95 and
max_tokens 2048; on the CPU fallback (hf) greedy and 256 tokens, as every DSPy LM on that engine
(``mpdp.integrations.dspy.dspy_defaults`` says why). Values given are always kept.

The seed's example (``python -m mpdp.dspy multigpu``) lives in ``examples/dspy_multigpu.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

from mpdp.config import DEFAULT_MODEL, SAMPLING, PoolConfig
from mpdp.defaults import sampling_defaults
from mpdp.engines import engine_class
from mpdp.integrations.dspy import AUTO, LM, _EngineBase, split_reasoning

logger = logging.getLogger("mpdp")

__all__ = ["vLLMOfflineMultiGPU", "vLLMOffline"]



class vLLMOfflineMultiGPU(LM):  # noqa: N801 - the seed's name
    """One model replica per GPU (or per ``tensor_parallel_size`` GPUs), as one DSPy LM.

    ``gpu_memory_utilization``, ``max_model_len``, ``max_num_seqs`` and ``trust_remote_code`` go to
    vLLM; on the CPU fallback they are ignored. ``model`` defaults to ``$MPDP_MODEL``, then the
    seed's ``$VLLM_MODEL_PATH``, then the embedded SmolLM2-135M-Instruct. Every other
    ``PoolConfig`` field is a keyword too (``routing``, ``max_pending``, ``launcher``, ...), or
    give ``config=PoolConfig(...)``, whose fields the seed's arguments given here override.
    """

    def __init__(self, model: str | None = None, num_gpus: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, max_tokens: int | None = AUTO, temperature: float | None = AUTO,
                 top_p: float | None = AUTO, tensor_parallel_size: int | None = None, *, engine: str | None = None,
                 num_workers: int | None = None, max_num_seqs: int | None = None,
                 trust_remote_code: bool | None = None, engine_options: dict[str, Any] | None = None,
                 config: PoolConfig | None = None, **kw):
        from mpdp.pool import default_engine

        base = config or PoolConfig()
        num_gpus = num_gpus or base.num_gpus or 4               # the seed's default: 4 GPUs
        tensor_parallel_size = tensor_parallel_size or base.tensor_parallel_size
        num_workers = num_workers or base.num_workers
        gpus = kw.pop("gpus", None) or base.gpus               # on the CPU fallback: not used

        self.requested_gpus = num_gpus
        if isinstance(engine, _EngineBase):      # loading a saved program: the engines come built
            temperature, max_tokens, top_p = _seed_defaults(engine.handle.engine_name, temperature, max_tokens,
                                                            top_p)
            super().__init__(model, engine=engine, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                             **kw)
            return
        model = model or (config.model if config else None) or os.environ.get("MPDP_MODEL") \
            or os.environ.get("VLLM_MODEL_PATH") or DEFAULT_MODEL
        engine = engine or base.engine or default_engine()
        temperature, max_tokens, top_p = _seed_defaults(engine, temperature, max_tokens, top_p)
        options = {**base.engine_options, **(engine_options or {})}
        on_gpus = engine_class(engine).uses_gpu
        if on_gpus:
            vllm_options = {"gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
                            "max_num_seqs": max_num_seqs, "trust_remote_code": trust_remote_code}
            options = {**{k: v for k, v in vllm_options.items() if v is not None}, **options}
            placement = {"num_gpus": num_gpus, "num_workers": num_workers, "gpus": gpus}
        else:
            # No GPU: as many CPU workers as the GPUs asked for (one per core at most).
            replicas = max(1, num_gpus // max(1, tensor_parallel_size))
            placement = {"num_workers": num_workers or max(1, min(replicas, os.cpu_count() or 1)),
                         "num_gpus": None, "gpus": None}
        super().__init__(model, engine=engine, config=config,
                         tensor_parallel_size=tensor_parallel_size if on_gpus else 1,
                         engine_options=options, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                         **placement, **kw)

    def batch_generate(self, prompts: list[Any], *, chat: bool = True, **overrides) -> list[Any]:
        """Generate for every prompt at once, spread over the workers; results in input order.

        Each prompt is a string (sent as one user message; ``chat=False`` sends it as raw text
        without the chat template), a messages list, or a dict as ``Pool.generate`` takes.
        ``overrides`` are sampling keywords for this batch. Returns strings, or for ``n > 1`` a
        list of n strings per prompt. Reasoning (``<think>…</think>``) is cut from each answer.
        Bypasses DSPy's cache and history (it is the pool's own batch call).
        """
        items = [{"messages": [{"role": "user", "content": p}]} if chat and isinstance(p, str) else p
                 for p in prompts]
        # The LM's sampling keywords (DSPy's own call keywords are not the pool's), then the overrides.
        sampling = {k: v for k, v in self.kwargs.items() if v is not None and k in SAMPLING}
        sampling.update({k: v for k, v in overrides.items() if v is not None})
        pool = self.pool
        start = time.monotonic()
        completions = pool.generate(items, timeout=self.engine.request_timeout, **sampling)
        self._log_distribution(pool, completions, time.monotonic() - start)
        tags = self.engine.reasoning_tags
        if sampling.get("n", 1) > 1:
            return [[split_reasoning(text, tags)[1] for text in c.choices] for c in completions]
        return [split_reasoning(c.text, tags)[1] for c in completions]

    @staticmethod
    def _log_distribution(pool, completions, seconds: float) -> None:
        served = Counter(c.worker for c in completions)
        gpus = {w["index"]: w.get("gpus") for w in pool.stats().get("workers", [])}
        shares = ", ".join(f"worker {w}{f' (GPU {_gpu_list(gpus.get(w))})' if gpus.get(w) else ''}: {n}"
                           for w, n in sorted(served.items()))
        logger.info("batch_generate: %d prompts in %.2f s on %d workers: %s",
                    len(completions), seconds, len(served), shares)

    def inspect(self) -> dict[str, Any]:
        """The configuration and, once started, the pool's per-worker figures (the seed's inspect())."""
        config = self.handle.config
        info = {"model": config.model, "engine": config.engine, "num_gpus_requested": self.requested_gpus,
                "num_workers": config.num_workers, "tensor_parallel_size": config.tensor_parallel_size,
                "engine_options": dict(config.engine_options),
                "temperature": self.kwargs.get("temperature"), "max_tokens": self.kwargs.get("max_tokens"),
                "top_p": self.kwargs.get("top_p"), "started": self.pool_started}
        stats = self.stats()
        if stats is not None:
            info["workers"] = [{k: w.get(k) for k in ("index", "gpus", "requests", "tokens", "state")}
                               for w in stats["workers"]]
            info["total_requests"] = stats.get("submitted")
        return info

    def shutdown(self) -> None:
        """Stop the workers (the seed's name for close())."""
        self.close()


class vLLMOffline(vLLMOfflineMultiGPU):  # noqa: N801 - the seed's name
    """One model instance (on one GPU, or ``tensor_parallel_size`` GPUs; one CPU worker without GPU)."""

    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 max_tokens: int | None = AUTO, temperature: float | None = AUTO, top_p: float | None = AUTO,
                 **kw):
        kw.setdefault("num_workers", 1)
        super().__init__(model, num_gpus=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                         max_model_len=max_model_len, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, tensor_parallel_size=tensor_parallel_size, **kw)


def _seed_defaults(engine: str, temperature, max_tokens, top_p):
    """The seed's sampling defaults on vLLM (and echo); a DSPy LM's on the CPU fallback: the
    ``seed`` and ``seed_hf`` rows of ``mpdp.defaults``. Values given are kept."""
    row = sampling_defaults("seed_hf" if engine == "hf" else "seed")
    return tuple(row.get(name) if value is AUTO else value
                 for name, value in (("temperature", temperature), ("max_tokens", max_tokens), ("top_p", top_p)))


def _gpu_list(gpus) -> str:
    return ",".join(str(g) for g in gpus) if isinstance(gpus, (list, tuple)) else str(gpus)
