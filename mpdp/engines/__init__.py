"""Engines by name. Imported lazily: the parent process must not import torch or vLLM."""

from __future__ import annotations

import importlib

from mpdp.engines.base import Engine

ENGINES = {
    "echo": "mpdp.engines.echo:EchoEngine",
    "hf": "mpdp.engines.hf:HFEngine",
    "vllm": "mpdp.engines.vllm:VLLMEngine",
}


def engine_class(name: str) -> type[Engine]:
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module), cls)


def resolve_model(name: str, model: str, options: dict) -> str:
    """What the engine will load: engines with weights turn a model name into a local folder (in the parent)."""
    if not engine_class(name).loads_weights:
        return model
    from mpdp.models import resolve_model as resolve_weights

    return resolve_weights(model)
