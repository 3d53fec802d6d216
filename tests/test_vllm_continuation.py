"""A vLLM stream that outlives its worker (the engine's side, on CPU: vLLM is not installed here).

The dispatcher sends a stream whose worker died to another worker with what it delivered: the
token ids and how many characters of their text. The vllm engine puts those ids after the
prompt, decodes their text in the prompt's context (as the streamed text was decoded), sends the
part not yet delivered first, and ends with the whole text. The GPU test
(``tests/test_vllm_gpu.py``) kills a real vLLM worker in the middle of a stream.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mpdp.core.resume import Delivered, why_not
from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.engines.echo import EchoEngine
from mpdp.engines.vllm import VLLMEngine, _Accumulated

PIECES = {1: "▁The", 2: "▁dog", 3: "▁cat", 4: "s", 5: "▁sat", 6: ".", 0: "</s>"}


class Tokenizer:
    """SentencePiece-like: "▁" is a space, and a text's leading space is dropped when decoded
    alone (so a seam decoded without its context would lose a space)."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        pieces = [PIECES[i] for i in ids if not (skip_special_tokens and i == 0)]
        return "".join(pieces).replace("▁", " ").removeprefix(" ")


def engine(max_model_len=64, defaults=None) -> VLLMEngine:
    e = object.__new__(VLLMEngine)          # the parts _resumed reads; no vLLM behind it
    e._tokenizer, e._max_model_len, e._defaults = Tokenizer(), max_model_len, dict(defaults or {})
    return e


def test_the_streamed_tokens_text_is_decoded_in_the_prompts_context_and_the_rest_is_owed():
    # " cats" was streamed as far as " ca" (3 characters) when the worker died.
    head = engine()._resumed([[[3, 4], 3]], [1, 2], {"max_tokens": 10})
    assert (head.ids, head.text, head.owed, head.finish, head.count) == ([3, 4], " cats", "ts", None, 2)


@pytest.mark.parametrize("ids, params, finish", [
    ([3, 4, 5], {"max_tokens": 3}, "length"),                 # all it could make was made
    ([3, 0], {"max_tokens": 10}, "stop"),                     # its last token was the end
    ([3, 0], {"max_tokens": 10, "ignore_eos": True}, None),   # ... unless told to go past it
    ([3, 4, 5], {"max_tokens": "context"}, "length"),         # the context (8 = 5 + 3) is full
    ([3, 4], {"max_tokens": "context"}, None),
    ([3], {}, None),                                          # vLLM's default of 16
])
def test_a_continuation_that_had_already_ended_ends_the_same_way(ids, params, finish):
    e = engine(max_model_len=8)
    assert e._resumed([[ids, 0]], [1, 2, 1, 2, 1], params).finish == finish


def test_bad_continuations_are_refused():
    with pytest.raises(ValueError, match="one choice"):
        engine()._resumed([[[3], 0], [[3], 0]], [1], {})
    with pytest.raises(ValueError, match="non-negative ints"):
        engine()._resumed([[[3, -1], 0]], [1], {})


def delta(text, ids, finish=None):
    return SimpleNamespace(outputs=[SimpleNamespace(index=0, text=text, token_ids=ids, finish_reason=finish,
                                                    logprobs=None)], num_cached_tokens=None)


def test_a_continued_stream_sends_what_is_owed_first_and_ends_whole():
    head = engine()._resumed([[[3, 4], 3]], [1, 2], {"max_tokens": 10})
    acc = _Accumulated(2, lambda choice: [], head)
    out = delta(" sat", [5])
    acc.add(out)
    first = acc.partial(9, out)
    assert first.texts == ["ts sat"] and first.token_ids == [[5]] and not first.finished
    out = delta(".", [6])
    acc.add(out)
    assert acc.partial(9, out).texts == ["."]                  # owed once, not again
    out = delta("", [], "length")
    acc.add(out)
    final = acc.final(9, out)
    assert final.texts == [" cats sat."] and final.completion_tokens == 4 and final.prompt_tokens == 2
    assert final.finish_reasons == ["length"]


def test_what_was_streamed_plus_what_comes_is_the_whole_text_for_a_consumer():
    # The consumer's view: " ca" before the death, then the continuation's pieces.
    head = engine()._resumed([[[3, 4], 3]], [1, 2], {"max_tokens": 10})
    acc = _Accumulated(2, lambda choice: [], head)
    got = " ca"
    for text, ids in ((" sat", [5]), (".", [6])):
        out = delta(text, ids)
        acc.add(out)
        got += acc.partial(9, out).texts[0]
    assert got == acc.final(9, delta("", [], "stop")).texts[0] == " cats sat."


def test_a_continuation_with_nothing_left_is_answered_without_vllm():
    head = engine()._resumed([[[3, 0], 4]], [1, 2], {"max_tokens": 10})
    res = head.result(9, 2)
    assert res == EngineResult(id=9, texts=[" cat"], finish_reasons=["stop"], prompt_tokens=2, completion_tokens=2)


def test_which_streams_the_vllm_engine_continues():
    delivered = Delivered()
    delivered.add(EngineResult(id=1, texts=["ab"], token_ids=[[7, 8]], finished=False))
    ask = lambda **params: why_not(EngineRequest(id=1, prompt="x", params=params, stream=True),   # noqa: E731
                                   delivered, VLLMEngine.cannot_continue)
    assert ask(max_tokens=9) is None
    assert ask(response_format={"type": "text"}) is None
    assert "n > 1" in ask(n=2)
    assert "grammar" in ask(response_format={"type": "json_object"})
    assert "logprobs" in ask(logprobs=1)
    assert EchoEngine.cannot_continue({"n": 2}) is None            # echo and hf continue every choice
    assert "cannot continue" in why_not(EngineRequest(id=1, prompt="x", stream=True), delivered, None)


# -- the seam inside a character, with a real tokenizer and vLLM's own detokenization ------------

@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from mpdp.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def real_engine(tokenizer) -> VLLMEngine:
    from mpdp.engines.logprobs import token_bytes

    e = engine()
    e._tokenizer, e._token_bytes = tokenizer, token_bytes(tokenizer)
    return e


def vllm_run(e, tokenizer, prompt, answer, head=None):
    """One worker's stream of ``answer`` (what a temperature-0 run makes), its results one per
    token, as vLLM's detokenizer makes the text: a DecodeStream primed with the prompt (the
    continuation's prompt holds the streamed tokens), no text until a character is whole."""
    from tokenizers.decoders import DecodeStream

    done = head.ids if head is not None else []
    stream = DecodeStream(ids=prompt + done, skip_special_tokens=True)
    acc = _Accumulated(len(prompt), lambda choice: [], head, e._token_bytes)
    rest = answer[len(done):]
    for k, token in enumerate(rest):
        last = k == len(rest) - 1
        out = delta(stream.step(tokenizer._tokenizer, token) or "", [token], "length" if last else None)
        acc.add(out)
        yield acc.final(9, out) if last else acc.partial(9, out)


@pytest.mark.parametrize("text", [" 日本語 🙂 ok", " naïve café — “quoted” 😀😀 end"])
def test_a_stream_cut_inside_a_character_reaches_the_consumer_whole_after_one_or_two_deaths(smollm2, text):
    # Byte-level BPE splits a CJK character or an emoji over several tokens: a worker can die
    # after some of them were streamed, their character not yet delivered.
    from mpdp.pool import _StreamBase

    e = real_engine(smollm2)
    prompt = smollm2.encode("Say it:", add_special_tokens=True)
    answer = smollm2.encode(text, add_special_tokens=False)
    cuts = [(a,) for a in range(1, len(answer) - 1)] + \
        [(a, b) for a in range(1, len(answer) - 2) for b in range(a + 1, len(answer) - 1)]
    for cut in cuts:
        deaths = cut
        consumer, delivered, head, final = _StreamBase(), Delivered(), None, None
        got, partials = "", 0
        while final is None:
            for res in vllm_run(e, smollm2, prompt, answer, head):
                if res.finished:
                    final = res
                    got += consumer._delta(res).texts[0]
                    break
                delivered.add(res)
                got += consumer._delta(res).texts[0]
                partials += 1
                if deaths and partials >= deaths[0]:   # after as many partial results
                    deaths = deaths[1:]        # the worker dies here: the rest goes on elsewhere
                    head = e._resumed(delivered.continuation(), prompt, {"max_tokens": 100})
                    break
        assert got == final.texts[0] == text, (cut, got)
        assert final.completion_tokens == len(answer) and final.prompt_tokens == len(prompt)


class CleaningTokenizer(Tokenizer):
    """As a transformers 4 tokenizer whose config sets clean_up_tokenization_spaces (Llama 3's
    does): decode drops the space before punctuation unless told not to. vLLM's detokenizer never
    cleans up, so the streamed text keeps it."""

    clean_up_tokenization_spaces = True

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):
        text = super().decode(ids, skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return text.replace(" !", "!").replace(" .", ".") if clean else text


def test_the_streamed_text_is_decoded_as_vllm_streamed_it_without_cleaning_up_spaces():
    # " cat !" (PIECES 3, 7) came out of vLLM as " cat !"; " c" was delivered when the worker died.
    PIECES[7] = "▁!"
    try:
        e = engine()
        e._tokenizer = CleaningTokenizer()
        head = e._resumed([[[3, 7], 2]], [1, 2], {"max_tokens": 10})
    finally:
        del PIECES[7]
    assert (head.text, head.owed) == (" cat !", "at !")


def test_a_partials_token_ids_end_where_a_character_does_even_when_a_token_straddles_two():
    # "日本" is e6 97 a5 e6 9c ac: a byte-level BPE vocabulary may hold a token that ends one
    # character and starts the next (Llama 3's and Qwen's do), so the last token's own
    # character being unfinished does not make the one before it whole.
    pieces = {10: b"\xe6\x97", 11: b"\xa5\xe6", 12: b"\x9c\xac", 13: b"!"}
    acc = _Accumulated(2, lambda choice: [], token_bytes=pieces.__getitem__)
    released = []
    for token, text in ((10, ""), (11, ""), (12, "日本"), (13, "!")):
        out = delta(text, [token])
        acc.add(out)
        released += acc.partial(9, out).token_ids[0]
        b"".join(pieces[t] for t in released).decode()      # a death here resumes after whole characters
    assert released == [10, 11, 12, 13]
