"""The hf engine must never take its worker down for one request's sake, and a long prefill must
not look like a hung engine: each runs on a real pool of real SmolLM2 workers, and the proof is
``restarts`` not growing in ``pool.stats()`` during the test (the pool is shared by the module:
a test compares with what it found, so one test's crash does not fail the others)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import mpdp  # noqa: E402
from conftest import restarts  # noqa: E402

# Generous bounds, not expectations: on 2 cores beside other work (load 10) the 7001-token
# prefill alone took over 200 s, where it takes ~20 s on a quiet machine.
pytestmark = pytest.mark.timeout(900)

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def pool():
    # One worker: a crash could not hide behind a second one serving the retry. Heartbeats come
    # from their own thread, so only a frozen process or one engine call past the step budget
    # (120 s for SmolLM2 with these options) would kill it; the prefill budget is 128 tokens a step
    # (steps of ~0.2-0.8 s unloaded, many times that when other processes take the cores).
    with mpdp.Pool(engine="hf", num_workers=1, max_crashes=1, heartbeat_interval=0.2,
                   heartbeat_timeout=10.0, engine_options={"max_prefill_tokens": 128}) as p:
        yield p


def test_a_7001_token_prompt_is_served_without_a_restart(pool):
    # Chunked into steps of 128 tokens (~15-25 s in all on 2 cores): served, its worker kept
    # (max_crashes=1: a kill would fail it with WorkerCrashed).
    before = restarts(pool)
    ids = [100 + (i * 7919) % 40000 for i in range(7001)]
    future = pool.submit(prompt_token_ids=ids, temperature=0, max_tokens=3)
    try:
        c = future.result(timeout=600)
    finally:
        future.cancel()      # if it timed out: abort it, or the next tests wait behind its prefill
    assert c.prompt_tokens == 7001 and c.completion_tokens >= 1
    assert restarts(pool) == before


@pytest.mark.parametrize("sampling", [{"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-300}])
def test_extreme_sampling_values_are_served_as_greedy(pool, sampling):
    before = restarts(pool)
    greedy = pool.submit(messages=PARIS, temperature=0, max_tokens=8).result(timeout=300).text
    # temperature 1e-40 once overflowed the softmax to NaN; top_p 1e-300 rounds to 0 in float32 and
    # dropped every token. Both now mean "the top token" (vLLM treats temperature < 1e-5 as greedy).
    assert pool.submit(messages=PARIS, max_tokens=8, **sampling).result(timeout=300).text == greedy
    assert restarts(pool) == before


@pytest.mark.parametrize("kwargs", [
    {"chat_template": "{{ raise_exception('no such conversation') }}"},
    {"chat_template": "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"},
    {"chat_template": "{{ messages[0].content + 1 }}"},
])
def test_a_chat_template_error_fails_its_request_alone(pool, kwargs):
    before = restarts(pool)
    bad = pool.submit(messages=PARIS, temperature=0, max_tokens=4, chat_template_kwargs=kwargs)
    good = pool.submit(messages=PARIS, temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="chat template"):
        bad.result(timeout=300)
    assert good.result(timeout=300).text
    assert restarts(pool) == before


def test_unknown_engine_options_are_refused_by_name():
    from mpdp.engines.base import WorkerPlacement
    from mpdp.engines.hf import HFEngine

    with pytest.raises(ValueError, match="max_num_seqs"):
        HFEngine("smollm2-135m-instruct", {"max_num_seqs": 8, "dtype": "float32"}, WorkerPlacement(0))
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        HFEngine("smollm2-135m-instruct", {"max_prefill_tokens": 0}, WorkerPlacement(0))
