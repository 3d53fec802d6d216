"""Partial outputs: engines report text as they decode it, the wire carries it, and Pool.stream /
astream hand it out; the deltas always join to the finished text."""

from __future__ import annotations

import asyncio
import os

import pytest

import mpdp
from conftest import wait_until

pytestmark = pytest.mark.usefixtures("no_child_left")


def test_echo_streams_in_pieces_that_join_to_the_text(make_pool):
    pool = make_pool(engine_options={"delay_s": 0.2, "stream_piece": 3})
    s = pool.stream("streamed in pieces", max_tokens=100, n=2)
    deltas = list(s)
    assert len(deltas) > 2 and deltas[-1].finished
    assert ["".join(d.texts[i] for d in deltas) for i in range(2)] == ["streamed in pieces"] * 2
    assert s.result().text == "streamed in pieces"


def test_leaving_a_stream_early_aborts_it_in_the_engine(make_pool):
    pool = make_pool(num_workers=1, engine_options={"faults": True, "delay_s": 30.0, "stream_piece": 1})
    s = pool.stream("a long held stream", max_tokens=100)
    for _ in s:
        break                                     # the generator's finally cancels the request
    wait_until(lambda: pool.submit("!held").result(timeout=10).text == "", 10,
               what="the abandoned stream to leave the engine")


def test_astream_yields_deltas_and_the_error_of_a_failed_request(make_pool):
    pool = make_pool(engine_options={"delay_s": 0.1, "max_model_len": 20})

    async def main():
        s = await pool.astream("async pieces", max_tokens=8)
        text = "".join([d.texts[0] async for d in s])
        bad = await pool.astream("x" * 40, max_tokens=8)
        with pytest.raises(mpdp.ContextWindowExceededError):
            async for _ in bad:
                pass
        return text

    assert asyncio.run(main()) == "async pi"


@pytest.mark.timeout(300)
def test_hf_streams_every_step_and_joins_to_the_greedy_text(no_child_left):
    with mpdp.Pool(engine="hf", num_workers=1) as pool:
        kw = dict(max_tokens=24, temperature=0.0)
        msgs = [{"role": "user", "content": "Name three colours."}]
        whole = pool.submit(messages=msgs, **kw).result(timeout=120)
        s = pool.stream(messages=msgs, **kw)
        deltas = [d.texts[0] for d in s]
        assert len(deltas) > 5                    # per decoding step, not one piece at the end
        assert "".join(deltas) == whole.text == s.result().text
        s = pool.stream("The capital of France is", max_tokens=30, temperature=0.0, stop=["."])
        assert "".join(d.texts[0] for d in s) == s.result().text and "." not in s.result().text
