"""The hf engine driven directly (no pool), on the embedded SmolLM2-135M-Instruct, on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mpdp.engines.base import ContextWindowExceeded, EngineRequest, WorkerPlacement  # noqa: E402

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
# (prompt, max_tokens, stop): some end on EOS, some on length, one on a stop string.
MIXED = [
    ("Write a haiku about the sea.", 24, None),
    ("What is 2+2?", 20, None),
    ("List three fruits.", 6, None),
    ("hi", 12, None),
    ("Translate 'good morning' into French.", 20, None),
    ("Tell me a story about a dragon who bakes bread.", 30, [","]),
]


@pytest.fixture(scope="module")
def folder():
    from mpdp.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def engine(folder):
    from mpdp.engines.hf import HFEngine

    eng = HFEngine(folder, {"max_batch_size": 8}, WorkerPlacement(index=0, num_threads=2))
    yield eng
    eng.close()


def chat(text):
    return [{"role": "user", "content": text}]


def mixed_request(i, **extra):
    text, max_tokens, stop = MIXED[i]
    params = {"temperature": 0, "max_tokens": max_tokens, **extra}
    if stop:
        params["stop"] = stop
    return EngineRequest(id=i, messages=chat(text), params=params)


def drain(engine, requests=(), later=()):
    """Run the engine until idle; ``later`` = [(step, request)] added before that step.
    Returns {id: (result, step it came back in)}."""
    for r in requests:
        engine.add(r)
    later, out, step = list(later), {}, 0
    while engine.has_unfinished() or later:
        while later and later[0][0] <= step:
            engine.add(later.pop(0)[1])
        for result in engine.step():
            assert result.id not in out, "a request was reported twice"
            out[result.id] = (result, step)
        step += 1
        assert step < 500
    return out


@pytest.fixture(scope="module")
def solo(engine):
    """Each MIXED prompt run alone (greedy): the reference for batched runs."""
    return {i: drain(engine, [mixed_request(i)])[i][0] for i in range(len(MIXED))}


def test_the_step_budget_is_generous_and_grows_with_the_work_of_a_step(engine):
    from mpdp.engines.hf import step_budget

    assert engine.step_timeout == 120.0            # SmolLM2-135M, 256 prefill tokens a step
    assert step_budget(135_000_000, 256, 16) == 120.0
    assert step_budget(7_000_000_000, 256, 16) == 7 * 120.0
    assert step_budget(135_000_000, 1024, 16) == 4 * 120.0


def test_resolve_model_names(folder, tmp_path):
    from mpdp.models import resolve_model

    assert resolve_model("SmolLM2-135M-Instruct") == folder
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_paris(engine):
    result, _ = drain(engine, [EngineRequest(id=1, messages=PARIS, params={"temperature": 0, "max_tokens": 16})])[1]
    assert result.error is None
    assert "Paris" in result.texts[0]
    assert result.finish_reasons == ["stop"]
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 16


def test_matches_plain_generate(engine, folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(PARIS, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result, _ = drain(engine, [EngineRequest(id=2, messages=PARIS, params={"temperature": 0, "max_tokens": 16})])[2]
    assert result.texts == [expected]
    assert result.prompt_tokens == ids.shape[1]


def test_batched_equals_solo(engine, solo):
    batched = drain(engine, [mixed_request(i) for i in range(len(MIXED))])
    for i, (text, max_tokens, stop) in enumerate(MIXED):
        result, _ = batched[i]
        assert result.texts == solo[i].texts, text
        assert result.finish_reasons == solo[i].finish_reasons
        assert result.completion_tokens <= max_tokens
        if result.finish_reasons == ["length"]:
            assert result.completion_tokens == max_tokens
        if stop:
            assert result.finish_reasons == ["stop"] and stop[0] not in result.texts[0]
    # The mix really covers the ways to end: EOS, a stop string and max_tokens.
    reasons = [batched[i][0].finish_reasons[0] for i, (_, _, stop) in enumerate(MIXED) if not stop]
    assert "stop" in reasons and "length" in reasons


def test_joining_a_running_batch_equals_solo(engine, solo):
    # Requests added while a batch runs join it (prefilled on their own, then merged in).
    out = drain(engine, [mixed_request(0), mixed_request(5)],
                later=[(2, mixed_request(1)), (3, mixed_request(2)), (3, mixed_request(3)), (6, mixed_request(4))])
    for i in range(len(MIXED)):
        assert out[i][0].texts == solo[i].texts, MIXED[i][0]


def test_chunked_prefill_equals_whole(engine, solo, monkeypatch):
    # A tiny prefill budget: every prompt takes several steps, fresh and joining batches alike.
    monkeypatch.setattr(engine, "max_prefill_tokens", 16)
    out = drain(engine, [mixed_request(i) for i in range(3)],
                later=[(4, mixed_request(3)), (9, mixed_request(4)), (9, mixed_request(5))])
    for i in range(len(MIXED)):
        assert out[i][0].texts == solo[i].texts, MIXED[i][0]
    # Nothing comes back while a prompt is still being prefilled: 3 prompts of ~35 tokens take
    # about 7 steps of 16 tokens (3 rows x 5 columns) before the first token.
    assert min(step for _, step in out.values()) >= 5


def test_short_requests_come_back_first(engine):
    out = drain(engine, [EngineRequest(id=10, prompt="Once upon a time", params={"temperature": 0, "max_tokens": 20, "ignore_eos": True}),
                         EngineRequest(id=11, prompt="Once upon a time", params={"temperature": 0, "max_tokens": 3, "ignore_eos": True}),
                         EngineRequest(id=12, prompt="Once upon a time", params={"temperature": 0, "max_tokens": 1, "ignore_eos": True})])
    steps = {i: step for i, (_, step) in out.items()}
    assert steps[12] == 0 and steps[11] == 2 and steps[10] == 19  # prefill is step 0
    assert out[10][0].finish_reasons == ["length"] and out[10][0].completion_tokens == 20
    # Same prompt, greedy: the shorter texts are prefixes of the longer one.
    assert out[10][0].texts[0].startswith(out[11][0].texts[0])


def test_context_window(engine):
    limit = engine.max_model_len
    with pytest.raises(ContextWindowExceeded, match=str(limit)):
        engine.add(EngineRequest(id=20, prompt_token_ids=[100] * (limit + 5)))
    with pytest.raises(ContextWindowExceeded, match="max_tokens") as info:
        engine.add(EngineRequest(id=21, prompt_token_ids=[100] * 10, params={"max_tokens": limit}))
    assert str(limit) in str(info.value) and "10" in str(info.value)
    assert not engine.has_unfinished()


def test_bad_requests(engine):
    for bad in (EngineRequest(id=30, prompt_token_ids=[]),
                EngineRequest(id=31, prompt_token_ids=[engine.vocab_size]),
                EngineRequest(id=32, prompt="hi", params={"response_format": {"type": "yaml"}}),
                EngineRequest(id=35, prompt="hi", params={"response_format": {
                    "type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}}),
                EngineRequest(id=36, prompt="hi", params={"response_format": {"type": "json_schema"}}),
                EngineRequest(id=33, prompt="hi", params={"logprobs": 1000}),
                EngineRequest(id=34)):
        with pytest.raises(ValueError):
            engine.add(bad)
    assert not engine.has_unfinished()


def test_abort(engine):
    long = {"temperature": 0, "max_tokens": 30, "ignore_eos": True}
    engine.add(EngineRequest(id=40, prompt="Once upon a time", params=long))
    engine.add(EngineRequest(id=41, prompt="Once upon a time", params={**long, "max_tokens": 4}))
    engine.step()  # both running
    engine.add(EngineRequest(id=42, prompt="hello", params=long))  # waiting
    engine.abort([40, 42])
    out = drain(engine)
    assert set(out) == {41}
    # Aborting everything running leaves the engine idle at once.
    engine.add(EngineRequest(id=43, prompt="hello", params=long))
    engine.step()
    engine.abort([43])
    assert not engine.has_unfinished()
    assert engine.step() == []


def test_sampling_n_seed_logprobs(engine):
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "max_tokens": 8, "n": 3, "seed": 7, "ignore_eos": True}
    out = drain(engine, [EngineRequest(id=50, messages=PARIS, params=params),
                         EngineRequest(id=51, messages=PARIS, params=params),
                         EngineRequest(id=52, prompt="The capital of France is", params={"temperature": 0, "max_tokens": 3, "logprobs": 2})])
    a, b = out[50][0], out[51][0]
    assert len(a.texts) == 3 and a.texts == b.texts  # same seed, same texts
    assert a.completion_tokens == 24 and a.finish_reasons == ["length"] * 3
    lp = out[52][0].logprobs[0]
    assert len(lp) == 3 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in lp)
    assert lp[0]["token_id"] == lp[0]["top_logprobs"][0]["token_id"]  # greedy picks the top token
