"""Structured output on the hf engine: JSON formats enforced by xgrammar while decoding, on the
real SmolLM2-135M-Instruct. The engine is driven directly (no pool) except where the pool's own
path is the point."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

import mpdp  # noqa: E402
from mpdp.engines.base import EngineRequest, WorkerPlacement  # noqa: E402

pytestmark = pytest.mark.timeout(180)

# Bounded strings and arrays: the grammar itself keeps a sampled answer inside max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 20},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "languages", "student"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ASKS = [
    "Describe a French student who likes music, as JSON.",
    "Invent a person from Tokyo. Answer in JSON.",
    "Give me a profile of an old sailor.",
    "Who are you? Reply with JSON.",
]


@pytest.fixture(scope="module")
def engine():
    from mpdp.engines.hf import HFEngine
    from mpdp.models import resolve_model

    eng = HFEngine(resolve_model("smollm2-135m-instruct"), {"max_batch_size": 8},
                   WorkerPlacement(index=0, num_threads=2))
    yield eng
    eng.close()


def run(engine, requests):
    """Every request to completion, batched as the engine likes; {id: result}."""
    for r in requests:
        engine.add(r)
    out = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for result in engine.step():
            assert result.id not in out
            out[result.id] = result
    assert not engine.has_unfinished()
    return out


def chat(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schema_outputs_parse_and_validate(engine, temperature):
    # Batched (4 prompts, n=2: 8 rows), every row with its own matcher.
    params = {"temperature": temperature, "max_tokens": 120, "n": 2, "seed": 3, "response_format": PERSON_FORMAT}
    out = run(engine, [EngineRequest(id=i, messages=chat(a), params=params) for i, a in enumerate(ASKS)])
    assert sorted(out) == list(range(len(ASKS)))
    for result in out.values():
        assert result.error is None, result.error
        assert len(result.texts) == 2
        for text, reason in zip(result.texts, result.finish_reasons):
            assert reason == "stop", (reason, text)       # the grammar ended it, not max_tokens
            jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_an_object_and_plain_rows_are_untouched(engine):
    plain = {"temperature": 0, "max_tokens": 24}
    alone = run(engine, [EngineRequest(id=0, messages=chat(ASKS[1]), params=plain)])[0].texts[0]
    out = run(engine, [
        EngineRequest(id=1, messages=chat(ASKS[1]), params={**plain, "max_tokens": 80,
                                                            "response_format": {"type": "json_object"}}),
        EngineRequest(id=2, messages=chat(ASKS[1]), params=plain),
        EngineRequest(id=3, messages=chat(ASKS[1]), params={**plain, "response_format": {"type": "text"}}),
    ])
    assert out[1].finish_reasons == ["stop"]
    assert isinstance(json.loads(out[1].texts[0]), dict)
    # The mask touches only its own row: the unconstrained rows beside it decode as they do alone.
    assert out[2].texts[0] == out[3].texts[0] == alone


def test_a_schema_string_and_a_request_joining_a_running_batch(engine):
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    long = EngineRequest(id=1, messages=chat("Tell me a long story."), params={"temperature": 0, "max_tokens": 40,
                                                                               "ignore_eos": True})
    engine.add(long)
    engine.step()
    engine.step()                              # the story is decoding; the JSON request joins it
    joined = EngineRequest(id=2, messages=chat("Is water wet?"), params={
        "temperature": 0, "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"name": "flag", "schema": json.dumps(flag)}}})
    out = run(engine, [joined])
    assert json.loads(out[2].texts[0]) in ({"ok": True}, {"ok": False})
    assert out[1].finish_reasons == ["length"] and out[1].completion_tokens == 40


def test_bad_schemas_fail_the_request_alone(engine):
    for fmt in ({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}},
                {"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "yaml"}):
        with pytest.raises(ValueError, match="response_format"):
            engine.add(EngineRequest(id=9, prompt="hi", params={"response_format": fmt}))
    assert not engine.has_unfinished()


def test_through_the_pool(no_child_left):
    with mpdp.Pool(engine="hf", num_workers=1, max_tokens=120) as pool:
        futures = [pool.submit(messages=chat(a), temperature=0.8, seed=i, response_format=PERSON_FORMAT)
                   for i, a in enumerate(ASKS)]
        for f in futures:
            c = f.result(timeout=120)
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), PERSON)
