"""The OpenAI layer (``mpdp/openai_api``) and the error classifier without a pool: the rules every
door shares, the kind -> status table, usage and finish reasons."""

from __future__ import annotations

import dataclasses

import pytest

from mpdp import errors
from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes
from mpdp.requests import Completion

Q = [{"role": "user", "content": "hi"}]


def chat(**body):
    return parsing.parse({"messages": Q, **body}, parsing.CHAT, ["m"])


def test_max_completion_tokens_wins_whatever_the_order():
    assert chat(max_completion_tokens=3, max_tokens=9).sampling == {"max_tokens": 3}
    assert chat(max_tokens=9, max_completion_tokens=3).sampling == {"max_tokens": 3}
    with pytest.raises(errors.InvalidRequest) as info:
        chat(max_tokens=9, max_completion_tokens=0)
    assert info.value.param == "max_completion_tokens"      # the client's name for the field


@pytest.mark.parametrize("body, param", [
    ({"tempreature": 0}, "tempreature"),             # falsy, still refused
    ({"priority": 1}, "priority"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"stream": "True"}, "stream"),
])
def test_mistakes_name_their_field(body, param):
    with pytest.raises(errors.InvalidRequest) as info:
        chat(**body)
    failure = errors.classify(info.value)
    assert (failure.kind, failure.param) == (errors.INVALID, param)
    assert shapes.api_error(info.value).status == 400


def test_what_asks_for_nothing_is_accepted():
    p = chat(priority=0, tools=[], user="u", stream=False, logprobs=False)
    assert p.sampling == {} and not p.logprobs and not p.stream


def test_a_model_not_served_is_not_found():
    with pytest.raises(errors.InvalidRequest) as info:
        parsing.parse({"model": "\ud800", "messages": Q}, parsing.CHAT, ["m"])
    err = shapes.api_error(info.value)
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    err.message.encode()                              # a lone surrogate is escaped, never echoed raw


def test_a_batch_file_cannot_stream_and_says_so():
    with pytest.raises(errors.InvalidRequest, match="a batch file cannot stream") as info:
        parsing.parse({"messages": Q, "stream": True}, parsing.CHAT, ["m"], streaming=False)
    assert info.value.param == "stream"
    assert not parsing.parse({"messages": Q, "stream": False}, parsing.CHAT, ["m"], streaming=False).stream


def test_continuous_usage_needs_include_usage_as_in_vllm():
    both = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    alone = chat(stream=True, stream_options={"continuous_usage_stats": True})
    assert both.continuous_usage and not alone.continuous_usage


@pytest.mark.parametrize("exc, kind, status", [
    (ValueError("temperature must be >= 0"), errors.INVALID, 400),
    (TypeError("unknown sampling keyword 'bogus'"), errors.INVALID, 400),
    (errors.ContextWindowExceededError("too long"), errors.CONTEXT, 400),
    (errors.PoolClosed("closed"), errors.UNAVAILABLE, 503),
    (errors.RequestTimeout("late"), errors.TIMEOUT, 504),
    (errors.EngineError("RuntimeError: boom"), errors.ENGINE, 500),
    (errors.WorkerCrashed("died twice"), errors.ENGINE, 500),
    (KeyError("bug"), errors.INTERNAL, 500),
])
def test_one_classifier_one_status_table(exc, kind, status):
    failure = errors.classify(exc)
    assert failure.kind == kind and shapes.STATUS[kind][0] == status
    assert not failure.message.startswith(("ValueError", "TypeError"))
    assert failure.ours == (status >= 500)


def test_usage_reports_cached_tokens_when_the_engine_counts_them():
    c = Completion("x", "stop", 10, 2, 0, ["x"], ["stop"])
    assert "prompt_tokens_details" not in shapes.usage([c])
    cached = dataclasses.replace(c, cached_tokens=8)
    assert shapes.usage([cached, c])["prompt_tokens_details"] == {"cached_tokens": 8}


def test_finish_reasons_are_mapped_once():
    assert [shapes.finish_reason(r) for r in ("stop", "length", "abort", "", None)] == [
        "stop", "length", "abort", "stop", "stop"]


@pytest.mark.parametrize("prompt", [[5, -1], [[5], [-1]]])
def test_token_ids_refused_later_name_the_clients_field(prompt):
    # /v1/completions takes token ids in prompt; the pool's check names its own prompt_token_ids.
    p = parsing.parse({"prompt": [abs(t) for t in prompt] if type(prompt[0]) is int else [[5], [1]]},
                      parsing.COMPLETION, ["m"])
    refused = ValueError("prompt_token_ids has ids outside the vocabulary [0, 49152): [99999]")   # the engine's
    assert shapes.api_error(refused, p).param == "prompt"
    with pytest.raises(errors.InvalidRequest) as info:          # negative: refused by the parser, every door
        parsing.parse({"prompt": prompt}, parsing.COMPLETION, ["m"])
    assert info.value.param == "prompt"


@pytest.mark.filterwarnings("ignore:Passing OpenAI-style message:DeprecationWarning")   # DSPy 3.4's own
def test_text_content_parts_are_joined_alike_at_every_door(make_pool):
    """[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}] is "a\\nb" (as vLLM's server
    joins them) through Pool.submit, the OpenAI layer and DSPy; it was "ab" through the first two."""
    import mpdp

    parts = [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]
    pool = make_pool(num_workers=1)
    direct = pool.submit(messages=[{"role": "user", "content": parts}], max_tokens=64).result(timeout=60).text
    calls = parsing.parse({"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 64},
                          parsing.CHAT, ["m"]).pool_calls()
    via_api = pool.submit(**calls[0]).result(timeout=60).text
    lm = mpdp.dspy.LM(pool=pool, cache=False, max_tokens=64)
    via_dspy = lm(messages=[{"role": "user", "content": parts}])[0]
    assert direct == via_api == via_dspy == "first part\nsecond part"
