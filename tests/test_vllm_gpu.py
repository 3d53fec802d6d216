"""The vLLM engine on a real GPU, with random weights (``load_format="dummy"``).

Run on a GPU machine:  pytest -m gpu tests/test_vllm_gpu.py
Skipped where vLLM or a CUDA GPU is missing, or the SmolLM2-shaped model folder is not found
(``$MPDP_GPU_MODELS/smol``).

Random weights generate random tokens, so these tests assert what does not depend on the
weights: token counts, finish reasons, max_tokens, chat templating (prompt length), stop
strings, logprob shapes, JSON under a grammar, error isolation, abort.
The direct-engine test comes first, so its engine is gone before the pool's starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

MAX_MODEL_LEN = 2048
OPTIONS = {"load_format": "dummy", "enforce_eager": True, "gpu_memory_utilization": 0.3,
           "max_model_len": MAX_MODEL_LEN}
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]


def _smol_dir() -> str:
    candidates = [Path(os.environ["MPDP_GPU_MODELS"]) / "smol"] if os.environ.get("MPDP_GPU_MODELS") else []
    for c in candidates:
        if (c / "config.json").is_file():
            return str(c)
    pytest.skip(f"the SmolLM2-shaped model folder is not there (looked in {[str(c) for c in candidates]})")


def _require_gpu() -> None:
    pytest.importorskip("vllm")
    pytest.importorskip("torch")
    # Ask torch in a child process: torch.cuda.is_available() here would initialise the CUDA
    # driver in this process, and the engine core that vLLM forks from it (the direct-engine
    # test) could then not use CUDA.
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    if probe.stdout.strip() != "True":
        pytest.skip(f"no CUDA GPU ({(probe.stdout + probe.stderr).strip()[-200:]})")


@pytest.fixture(scope="module")
def model_dir() -> str:
    _require_gpu()
    return _smol_dir()


@pytest.fixture(scope="module")
def pool(model_dir):
    import mpdp

    # cache_aware's KV-event index is opt-in: on here, as the event tests below need it
    with mpdp.Pool(model=model_dir, engine="vllm", num_gpus=1, engine_options=OPTIONS,
                   routing_options={"events": True}, worker_logs="inherit") as p:
        yield p


def _ids(n: int, start: int = 1000) -> list[int]:
    return [start + (i * 37) % 20000 for i in range(n)]


# -- the engine alone, no pool ----------------------------------------------------------------------
def test_engine_add_step_abort(model_dir):
    from mpdp.engines.base import ContextWindowExceeded, EngineRequest, WorkerPlacement
    from mpdp.engines.vllm import VLLMEngine

    engine = VLLMEngine(model_dir, dict(OPTIONS), WorkerPlacement(0, [0], 4))
    try:
        assert engine.max_model_len == MAX_MODEL_LEN
        assert engine.capacity > engine.max_num_seqs >= 1
        assert not engine.has_unfinished() and engine.step() == []

        engine.add(EngineRequest(1, prompt_token_ids=_ids(40), params={"max_tokens": 4, "ignore_eos": True}))
        engine.add(EngineRequest(2, prompt_token_ids=_ids(40, 3000),
                                 params={"max_tokens": 1500, "ignore_eos": True}))
        engine.add(EngineRequest(3, prompt="Hello there", params={"max_tokens": 6, "ignore_eos": True, "n": 2}))
        with pytest.raises(ContextWindowExceeded, match=str(MAX_MODEL_LEN)):
            engine.add(EngineRequest(4, prompt_token_ids=_ids(MAX_MODEL_LEN)))
        with pytest.raises(ValueError):
            engine.add(EngineRequest(5, prompt="x", params={"response_format": {"type": "yaml"}}))
        with pytest.raises(ValueError):
            engine.add(EngineRequest(6, prompt_token_ids=[10**9]))        # out of the vocabulary
        assert engine.has_unfinished()

        results, steps, finished_at, counts = {}, 0, {}, []
        while engine.has_unfinished() and steps < 5000:
            for r in engine.step():
                assert r.id not in results, "a request came back twice"
                results[r.id] = r
                finished_at[r.id] = steps
            counts.append(engine.step_counts())     # (sequences that ran, tokens): the batch limit's input
            steps += 1
            if steps == 3:        # a request added between steps joins the running batch
                engine.add(EngineRequest(7, prompt_token_ids=_ids(20), params={"max_tokens": 3, "ignore_eos": True}))
            if 1 in results and 3 in results and 7 in results and 2 not in results:
                engine.abort([2])
        assert not engine.has_unfinished()
        assert set(results) == {1, 3, 7}, "the aborted request must never be reported"
        # One step() is one engine step: a 4-token request is back after a handful of steps.
        assert finished_at[1] < 50 and finished_at[7] < 60
        r1, r3, r7 = results[1], results[3], results[7]
        assert (r1.prompt_tokens, r1.completion_tokens, r1.finish_reasons) == (40, 4, ["length"])
        assert r1.error_type is None and len(r1.texts) == 1 and isinstance(r1.texts[0], str)
        assert r3.completion_tokens == 12 and r3.finish_reasons == ["length", "length"] and len(r3.texts) == 2
        assert r3.prompt_tokens > 0 and r3.logprobs is None
        assert (r7.prompt_tokens, r7.completion_tokens) == (20, 3)
        ran = [c for c in counts if c is not None]
        assert ran and max(n for n, _ in ran) >= 4 and sum(t for _, t in ran) >= 4 + 12 + 3
        assert engine.ready_extra["graph_max"] is None          # enforce_eager: no CUDA graph

        # After an abort the engine goes on serving.
        engine.add(EngineRequest(8, prompt_token_ids=_ids(10), params={"max_tokens": 2, "ignore_eos": True}))
        done = []
        while engine.has_unfinished():
            done += engine.step()
        assert [(r.id, r.completion_tokens) for r in done] == [(8, 2)]
    finally:
        engine.close()


# -- through the pool ---------------------------------------------------------------------------------
def test_text_prompt_max_tokens(pool):
    c = pool.generate(["The quick brown fox"], max_tokens=8, ignore_eos=True, temperature=0.8)[0]
    assert isinstance(c.text, str) and c.finish_reason == "length"
    assert c.completion_tokens == 8 and c.prompt_tokens > 0 and c.worker == 0
    # Without ignore_eos: never more than max_tokens, and "length" only when it was reached.
    for c in pool.generate([f"Question {i}:" for i in range(8)], max_tokens=5):
        assert 1 <= c.completion_tokens <= 5 and c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert c.completion_tokens == 5


def test_chat_messages_apply_the_template(pool, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = len(tok.encode(text, add_special_tokens=False))
    c = pool.submit(messages=MESSAGES, max_tokens=6, ignore_eos=True,
                    chat_template_kwargs={"enable_thinking": False}).result(timeout=120)
    assert c.prompt_tokens == expected
    assert c.completion_tokens == 6 and c.finish_reason == "length"


def test_token_ids_and_n(pool):
    c = pool.submit(prompt_token_ids=_ids(100), max_tokens=7, ignore_eos=True).result(timeout=120)
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (100, 7, "length")
    c = pool.submit(prompt_token_ids=_ids(30), n=2, max_tokens=5, ignore_eos=True, temperature=1.0).result(timeout=120)
    assert len(c.choices) == 2 and c.finish_reasons == ["length", "length"]
    assert c.completion_tokens == 10 and c.prompt_tokens == 30
    # Dict items with per-item overrides, as the benchmark sends them.
    out = pool.generate([{"prompt_token_ids": _ids(16), "max_tokens": m} for m in (1, 9, 3)], ignore_eos=True)
    assert [c.completion_tokens for c in out] == [1, 9, 3]


def test_stop_string(pool):
    # Random weights at temperature 1 draw nearly uniformly from the 49k-token vocabulary, where
    # half the tokens hold an "e": the stop string comes within a few tokens (none in 64: ~1e-19).
    outs = pool.generate([{"prompt_token_ids": _ids(24, 5000 + i)} for i in range(4)], max_tokens=64,
                         ignore_eos=True, temperature=1.0, stop=["e"])
    for c in outs:
        assert "e" not in c.text                 # the stop string itself is not returned
        assert c.finish_reason == "stop" and 1 <= c.completion_tokens < 64


def test_logprobs(pool):
    c = pool.submit(prompt_token_ids=_ids(12), max_tokens=6, ignore_eos=True, logprobs=0, n=2,
                    temperature=1.0).result(timeout=120)
    assert isinstance(c.logprobs, list) and len(c.logprobs) == 2
    for per_token in c.logprobs:                 # the one record every engine gives (engines/logprobs.py)
        assert len(per_token) == 6
        assert all(isinstance(r["logprob"], float) and r["logprob"] <= 0.0 for r in per_token)
        assert all(r["top_logprobs"] == [] and isinstance(r["bytes"], list) and r["token"] for r in per_token)
    top = pool.submit(prompt_token_ids=_ids(12), max_tokens=3, ignore_eos=True, logprobs=2).result(timeout=120)
    for r in top.logprobs[0]:
        assert len(r["top_logprobs"]) == 2 and r["top_logprobs"][0]["logprob"] >= r["top_logprobs"][1]["logprob"]
    plain = pool.submit(prompt_token_ids=_ids(12), max_tokens=3).result(timeout=120)
    assert plain.logprobs is None


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}}},
])
def test_response_format(pool, response_format):
    # Random weights under a grammar: the JSON is complete when it stopped, cut when it hit max_tokens.
    outs = pool.generate(["Answer in JSON."] * 4, max_tokens=200, temperature=1.0, response_format=response_format)
    for c in outs:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            assert isinstance(value, dict)
            if response_format["type"] == "json_schema":
                assert set(value) == {"ok"} and isinstance(value["ok"], bool)
        else:
            assert c.completion_tokens == 200
            assert c.text.lstrip().startswith("{")


def test_unknown_response_format_fails_at_submit_or_alone(pool):
    with pytest.raises((ValueError, TypeError)):
        pool.submit("x", response_format={"type": "yaml"}).result(timeout=60)


def test_overlong_prompt_fails_alone(pool):
    import mpdp

    good = {"prompt_token_ids": _ids(10), "max_tokens": 4, "ignore_eos": True}
    too_long = {"prompt_token_ids": _ids(MAX_MODEL_LEN + 10), "max_tokens": 4}
    out = pool.generate([good, too_long, good], return_exceptions=True)
    assert isinstance(out[1], mpdp.ContextWindowExceededError)
    assert str(MAX_MODEL_LEN + 10) in str(out[1]) and str(MAX_MODEL_LEN) in str(out[1])
    assert [out[0].completion_tokens, out[2].completion_tokens] == [4, 4]
    with pytest.raises(mpdp.ContextWindowExceededError):
        pool.submit(prompt_token_ids=_ids(MAX_MODEL_LEN), max_tokens=1).result(timeout=60)
    # The next request works.
    c = pool.submit(prompt_token_ids=_ids(MAX_MODEL_LEN - 10), max_tokens=4, ignore_eos=True).result(timeout=120)
    assert (c.prompt_tokens, c.completion_tokens) == (MAX_MODEL_LEN - 10, 4)


def test_cancel_aborts_inside_the_engine(pool):
    import time

    fut = pool.submit(prompt_token_ids=_ids(16), max_tokens=1900, ignore_eos=True)
    time.sleep(0.5)
    assert fut.cancel()
    c = pool.submit(prompt_token_ids=_ids(16), max_tokens=2, ignore_eos=True).result(timeout=60)
    assert c.completion_tokens == 2
    deadline = time.monotonic() + 30
    while pool.stats()["workers"][0]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.stats()["workers"][0]["in_flight"] == 0


def test_streamed_deltas_join_to_the_non_streamed_text(pool):
    kwargs = dict(max_tokens=48, temperature=0.0, ignore_eos=True)
    whole = pool.submit("Once upon a time", **kwargs).result(timeout=120)
    stream = pool.stream("Once upon a time", **kwargs)
    deltas = [d.texts[0] for d in stream]
    assert len(deltas) > 3                                # per step, not one piece at the end
    assert "".join(deltas) == whole.text == stream.result().text
    assert stream.result().completion_tokens == 48


def test_ready_reports_the_kv_cache_size(pool):
    assert pool.stats()["workers"][0]["kv_cache_tokens"] > 0


def test_the_batch_limit_is_adaptive_by_default_and_shown(pool):
    w = pool.stats()["workers"][0]
    assert pool.stats()["batch_limit"] == "adaptive"
    assert w["batch_limit_ceiling"] == w["capacity"]          # eager: no graph size to stop at
    assert 1 <= w["batch_limit"] <= w["capacity"]
    assert w["batch_limit_reason"] in ("starting", "probing", "settled at knee", "light load")


def test_kv_events_keep_an_exact_index_and_the_engine_reports_its_reuse(pool):
    import time

    ids = _ids(300, start=3000)                           # 18 whole blocks of 16 before the last token
    first = pool.submit(prompt_token_ids=ids, max_tokens=1, temperature=0.0).result(timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not pool.stats()["workers"][0].get("kv_blocks"):
        time.sleep(0.1)                                   # the BlockStored batch crosses the SUB socket
    worker = pool.stats()["workers"][0]
    assert worker["kv_events_live"] and worker["kv_blocks"] >= 18, worker
    second = pool.submit(prompt_token_ids=ids, max_tokens=1, temperature=0.0).result(timeout=120)
    assert first.cached_tokens is not None and second.cached_tokens == 288, (first, second)
    assert pool.stats()["workers"][0]["prefix_hit_rate"] > 0


def test_two_workers_sharing_a_gpu_start_one_after_another_and_get_alike_caches(model_dir):
    import mpdp

    options = {k: v for k, v in OPTIONS.items() if k != "gpu_memory_utilization"}
    options["gpu_memory_utilization"] = 0.3
    with mpdp.Pool(model=model_dir, engine="vllm", gpus=[0, 0], engine_options=options,
                   routing_options={"events": True}, worker_logs="inherit") as p:
        caches = [w["kv_cache_tokens"] for w in p.stats()["workers"]]
        texts = [c.text for c in p.generate(["a b c"] * 8, max_tokens=4, temperature=0.0)]
        # cache_aware with the engines' events: a long shared prefix, then its questions one by one
        doc = " ".join(["lorem ipsum dolor sit amet"] * 120)
        p.submit(doc + " Q0?", max_tokens=1).result(timeout=120)
        for i in range(1, 6):
            p.submit(f"{doc} Q{i}?", max_tokens=1).result(timeout=120)
        workers = p.stats()["workers"]
    assert len(set(texts)) == 1
    assert all(w["kv_events_live"] for w in workers), workers
    assert sum(w["predicted_exact"] for w in workers) >= 5, workers
    assert min(caches) > 0.5 * max(caches), caches         # not 1.87M against 38k


def test_a_stream_whose_worker_dies_continues_on_the_other_with_every_character_once(model_dir):
    """SIGKILL the vLLM worker in the middle of a stream: the other worker goes on from the
    tokens already streamed (they join the prompt), the consumer gets each character once, and
    the request makes all of its max_tokens, not max_tokens more."""
    import signal

    import mpdp

    with mpdp.Pool(model=model_dir, engine="vllm", gpus=[0, 0], engine_options=OPTIONS, routing="least_loaded",
                   worker_logs="inherit") as p:
        s = p.stream(prompt_token_ids=_ids(32), max_tokens=600, temperature=0.0, ignore_eos=True)
        got, killed = "", None
        for d in s:
            got += d.texts[0]
            if killed is None and d.completion_tokens >= 40:
                (w,) = [w for w in p.stats()["workers"] if w["in_flight"]]
                os.kill(w["pid"], signal.SIGKILL)
                killed = w["index"]
        res = s.result(timeout=120)
        after = p.submit(prompt_token_ids=_ids(8), max_tokens=4, ignore_eos=True).result(timeout=120)
    assert killed is not None and res.worker != killed
    assert got == res.text and len(got) > 0
    assert res.completion_tokens == 600 and res.finish_reason == "length"
    assert after.completion_tokens == 4
