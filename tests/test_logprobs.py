"""One logprob record for every engine (``mpdp/engines/logprobs.py``): each token carries its own
bytes (an emoji's pieces too), and the OpenAI shapes read the record the same way whatever the
engine: no consumer branches on it."""

from __future__ import annotations

import pytest

from mpdp.engines.base import EngineRequest, WorkerPlacement
from mpdp.engines.logprobs import record, token_bytes
from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes
from mpdp.requests import Completion

EMOJI = "I like 🍕 pizza"


@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("transformers")
    from mpdp.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_each_piece_of_an_emoji_has_its_own_bytes(tokenizer):
    of = token_bytes(tokenizer)
    ids = tokenizer(EMOJI + "<|im_end|>", add_special_tokens=False).input_ids
    pieces = [of(i) for i in ids]
    assert b"".join(pieces) == (EMOJI + "<|im_end|>").encode()      # the bytes of the text, nothing lost
    split = [p for p in pieces if p and not _utf8(p)]
    assert len(split) == 3 and b"".join(split).strip() == "🍕".encode()   # three pieces, none U+FFFD's bytes
    names = [record(i, of(i), -1.0)["token"] for i in ids]
    assert len(set(names)) == len(names) and "\ufffd" not in "".join(names)
    assert names[-1] == "<|im_end|>" and names[1] == " like"


def test_completion_top_logprobs_keep_one_key_per_piece(tokenizer):
    of = token_bytes(tokenizer)
    ids = tokenizer("🍕", add_special_tokens=False).input_ids
    top = [(i, of(i), -1.0 - n) for n, i in enumerate(ids)]
    records = [record(ids[0], of(ids[0]), -1.0, top)]
    c = Completion("x", "stop", 1, 1, 0, ["x"], ["stop"], [records])
    p = parsing.parse({"prompt": "x", "logprobs": 3}, parsing.COMPLETION, ["m"])
    lp = shapes.choice_logprobs(p, c, 0)
    assert len(lp["top_logprobs"][0]) == len(ids)                  # no collapse onto one "\ufffd" key
    chat = parsing.parse({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3},
                         parsing.CHAT, ["m"])
    content = shapes.choice_logprobs(chat, c, 0)["content"][0]
    assert [t["bytes"] for t in content["top_logprobs"]] == [list(of(i)) for i in ids]


def test_logprobs_zero_on_completions_is_a_list_per_token():
    records = [record(ord(ch), ch.encode(), -0.5) for ch in "ab"]
    c = Completion("ab", "stop", 1, 2, 0, ["ab"], ["stop"], [records])
    p = parsing.parse({"prompt": "x", "logprobs": 0}, parsing.COMPLETION, ["m"])
    lp = shapes.choice_logprobs(p, c, 0)
    assert lp["top_logprobs"] == [{"a": -0.5}, {"b": -0.5}] and lp["text_offset"] == [0, 1]
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.5, -0.5]


def test_hf_records_rebuild_the_text_byte_for_byte(folder, tokenizer):
    from mpdp.engines.hf import HFEngine

    engine = HFEngine(folder, {}, WorkerPlacement(index=0, num_threads=2))
    try:
        engine.add(EngineRequest(id=1, messages=[{"role": "user", "content": "Reply with one pizza emoji."}],
                                 params={"temperature": 0, "max_tokens": 8, "logprobs": 2}))
        results = []
        while engine.has_unfinished():
            results += engine.step()
    finally:
        engine.close()
    (res,) = results
    (records,) = res.logprobs
    specials = set(tokenizer.all_special_ids)
    text = bytes(b for r in records if r["token_id"] not in specials for b in r["bytes"])
    assert text.decode() == res.texts[0]
    for r in records:
        assert set(r) == {"token_id", "token", "bytes", "logprob", "top_logprobs"} and len(r["top_logprobs"]) == 2
        assert r["top_logprobs"][0]["logprob"] >= r["top_logprobs"][1]["logprob"] and r["logprob"] <= 0


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_vllm_logprobs_become_the_same_record():
    """vLLM gives per position a {token id: Logprob(logprob, rank)} of the top k plus the sampled
    token (whose rank may be past k); the record keeps the top k, best first, and the choice."""
    from types import SimpleNamespace as Logprob

    from mpdp.engines.vllm import _records

    choice = SimpleChoice(token_ids=[5, 6], logprobs=[
        {5: Logprob(logprob=-0.1, rank=1), 7: Logprob(logprob=-2.0, rank=2)},
        {8: Logprob(logprob=-0.5, rank=1), 9: Logprob(logprob=-1.0, rank=2), 6: Logprob(logprob=-3.0, rank=4)}])
    records = _records(choice, 2, lambda t: bytes([96 + t]))
    assert [(r["token"], r["logprob"]) for r in records] == [("e", -0.1), ("f", -3.0)]
    assert [[(t["token"], t["logprob"]) for t in r["top_logprobs"]] for r in records] == [
        [("e", -0.1), ("g", -2.0)], [("h", -0.5), ("i", -1.0)]]
    assert _records(choice, 0, lambda t: bytes([96 + t]))[1]["top_logprobs"] == []


class SimpleChoice:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs
