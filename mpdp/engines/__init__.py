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


def check_options(name: str, options: dict) -> None:
    """ValueError naming an option the engine does not take (in the caller's process)."""
    engine_class(name).check_options(options)


def check_sampling(name: str | type[Engine], params: dict) -> dict:
    """``params`` checked as every front door checks a request's sampling before it reaches a
    worker: the values (``mpdp.config.check_sampling``: TypeError for an unknown keyword,
    ValueError/TypeError naming a bad value) and that the engine serves each field (ValueError)."""
    from mpdp.config import check_sampling as check_values

    cls = engine_class(name) if isinstance(name, str) else name
    checked = check_values(params)
    unsupported = set(checked) - cls.sampling_fields
    if unsupported:
        raise ValueError(f"the {cls.name} engine does not support {', '.join(sorted(unsupported))}")
    return checked


def resolve_model(name: str, model: str, options: dict) -> str:
    """What the engine will load: engines with weights turn a model name into a local folder (in the parent)."""
    if not engine_class(name).loads_weights:
        return model
    from mpdp.models import resolve_model as resolve_weights

    return resolve_weights(model)
