"""The whole pool on the real SmolLM2-135M-Instruct (the hf engine, CPU workers)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import mpdp  # noqa: E402

pytestmark = pytest.mark.timeout(300)

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def plain_transformers_greedy(messages, max_new_tokens: int) -> str:
    """The reference: transformers' own greedy decoding on the same folder, no mpdp in the way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpdp.models import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def pool():
    with mpdp.Pool(model="smollm2-135m-instruct", engine="hf", num_workers=2) as p:
        yield p


def test_paris_through_the_pool(pool):
    c = pool.submit(messages=PARIS, temperature=0, max_tokens=16).result(timeout=120)
    assert "Paris" in c.text
    assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 16
    assert c.finish_reason in ("stop", "length")


def test_both_workers_agree_with_plain_transformers(pool):
    expected = plain_transformers_greedy(PARIS, 16)
    # Enough copies that both workers serve some (least-loaded routing spreads them).
    results = pool.generate([PARIS] * 6, temperature=0, max_tokens=16)
    assert {c.worker for c in results} == {0, 1}
    assert {c.text for c in results} == {expected}


def test_context_window_error_fails_that_request_alone(pool):
    too_long = "word " * 10000
    bad = pool.submit(too_long, max_tokens=4)
    good = pool.submit(messages=PARIS, temperature=0, max_tokens=8)
    with pytest.raises(mpdp.ContextWindowExceededError, match="8192"):
        bad.result(timeout=120)
    assert "Paris" in good.result(timeout=120).text
