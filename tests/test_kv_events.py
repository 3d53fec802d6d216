"""Exact prefix-cache routing from the engines' KV-cache events (issue 25), on CPU.

vLLM is not installed here: the event frames are built as vLLM's ``ZmqEventPublisher`` builds
them (topic, 8-byte big-endian sequence, msgpack payload of a ``KVEventBatch``), in both layouts
msgspec gives its structs (array-like and map).
"""

from __future__ import annotations

from types import SimpleNamespace

from mpdp.engines import vllm as vllm_engine
from mpdp.engines.base import EngineResult
from mpdp.wire import protocol


# -- what the engine reused, per request ---------------------------------------------------------
def _output(num_cached_tokens):
    choice = SimpleNamespace(index=0, text="hi", token_ids=[1, 2], finish_reason="length", logprobs=None)
    return SimpleNamespace(outputs=[choice], prompt_token_ids=list(range(40)), num_cached_tokens=num_cached_tokens)


def test_vllm_num_cached_tokens_reaches_the_result_and_crosses_the_wire():
    res = vllm_engine._result(7, _output(32))
    assert res.cached_tokens == 32 and res.prompt_tokens == 40
    _, body = protocol.decode(protocol.encode(protocol.Tag.RESULTS, [protocol.result_to_wire(res)]))
    assert protocol.result_from_wire(body[0]).cached_tokens == 32
    acc = vllm_engine._Accumulated(40)
    acc.add(_output(16))
    acc.add(_output(None))                 # a later delta that does not repeat it keeps the figure
    assert acc.final(7, _output(None)).cached_tokens == 16
    assert EngineResult(1).cached_tokens is None   # engines that do not say (hf, echo)
