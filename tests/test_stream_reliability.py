"""Streams: every character once, and the end always arrives.

- A streamed request whose worker dies continues on another worker from what was already
  delivered (the prompt plus the streamed token ids): ``Pool.stream``, ``Pool.astream`` and SSE
  consumers see each character once, and at temperature 0 the text of an uninterrupted run.
  Where a stream cannot continue it ends with ``StreamInterrupted``, never with repeated text.
- The final piece reaches a sync ``Stream`` before the future resolves, so it always ends with
  ``finished`` and its whole text.
- A consumer that fails (its event loop closed) ends its own stream only: the dispatcher, the
  pool and every other request go on.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import threading

import httpx
import openai
import pytest

import mpdp
import mpdp.pool
from conftest import wait_until
from mpdp.core.futures import PoolFuture
from test_server_support import ServerProcess

pytestmark = pytest.mark.timeout(300)

LONG = "".join(f"{i:04d}," for i in range(400))      # 2,000 characters, each position unique
# The echo engine streams one character a step (at least 2 ms each) and answers after delay_s:
# a 2,000-character stream takes seconds, so a worker can be killed in the middle of it.
SLOW_STREAM = {"delay_s": 6.0, "stream_piece": 1}


def kill_the_worker_streaming(pool) -> int:
    """SIGKILL the worker that holds a request; return its index."""
    (w,) = [w for w in pool.stats()["workers"] if w["in_flight"]]
    os.kill(w["pid"], signal.SIGKILL)
    return w["index"]


def restarted(pool, index: int) -> bool:
    return pool.stats()["workers"][index]["restarts"] >= 1


# -- 6: a worker death costs a stream nothing ----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_continues_after_its_worker_dies_with_every_character_once(make_pool, n):
    pool = make_pool(num_workers=2, engine_options=SLOW_STREAM)
    s = pool.stream(LONG, max_tokens=len(LONG), n=n)
    got = [""] * n
    killed = None
    for delta in s:
        got = [g + t for g, t in zip(got, delta.texts)]
        if killed is None and len(got[0]) >= 40:
            assert not delta.finished
            killed = kill_the_worker_streaming(pool)
    assert killed is not None and delta.finished
    assert got == [LONG] * n                       # not 2,000 characters plus a repeat
    assert s.result().choices == [LONG] * n
    wait_until(lambda: restarted(pool, killed), 60, what="the killed worker's restart")


def test_an_astream_continues_after_its_worker_dies_with_every_character_once(make_pool):
    pool = make_pool(num_workers=2, engine_options=SLOW_STREAM)

    async def main():
        s = await pool.astream(LONG, max_tokens=len(LONG), stop=["0399"])
        text, killed = "", False
        async for delta in s:
            text += delta.texts[0]
            if not killed and len(text) >= 40:
                await asyncio.to_thread(kill_the_worker_streaming, pool)
                killed = True
        return text, killed, (await asyncio.wrap_future(s.future)).text

    text, killed, whole = asyncio.run(main())
    assert killed and text == whole == LONG[:LONG.index("0399")]


def test_a_stream_that_cannot_continue_ends_with_an_error_never_repeated_text(make_pool):
    # Logprobs of the tokens streamed before the death died with their worker: such a stream is
    # not continued (nor restarted from its first token), it ends with StreamInterrupted.
    pool = make_pool(num_workers=2, engine_options=SLOW_STREAM)
    s = pool.stream(LONG, max_tokens=len(LONG), logprobs=1)
    text, killed = "", False
    with pytest.raises(mpdp.StreamInterrupted, match="logprobs"):
        for delta in s:                              # what came before the death, then the error
            text += delta.texts[0]
            if not killed and len(text) >= 40:
                kill_the_worker_streaming(pool)
                killed = True
    assert 40 <= len(text) < len(LONG) and LONG.startswith(text)
    with pytest.raises(mpdp.StreamInterrupted):
        s.result(timeout=10)
    assert pool.submit("still serving", max_tokens=20).result(timeout=30).text == "still serving"


@pytest.mark.timeout(600)
def test_hf_stream_killed_midway_yields_the_text_of_an_uninterrupted_run(no_child_left):
    """SmolLM2 at temperature 0: the continuation decodes in the context of the streamed tokens
    (no spurious space or merged word at the seam) and finds a stop string across it; each
    choice of n=2 continues on its own."""
    chat = dict(messages=[{"role": "user", "content": "Write a short poem about the sea."}],
                max_tokens=60, temperature=0.0)
    story = dict(prompt="Once upon a time, in a small village,", max_tokens=60, temperature=0.0, n=2)
    with mpdp.Pool(engine="hf", num_workers=2) as pool:
        whole = pool.submit(**story).result(timeout=300).text
        story["stop"] = [whole[len(whole) * 3 // 4:][:6]]       # late in the text: after the seam
        for kw in (chat, story):
            expected = pool.submit(**kw).result(timeout=300).choices
            restarts = sum(w["restarts"] for w in pool.stats()["workers"])
            s = pool.stream(**kw)
            got, killed, pieces = [""] * kw.get("n", 1), None, 0
            for delta in s:
                got = [g + t for g, t in zip(got, delta.texts)]
                pieces += 1
                if killed is None and pieces == 3 and not delta.finished:
                    killed = kill_the_worker_streaming(pool)
            assert killed is not None, "the stream ended before its worker could be killed"
            assert got == expected == s.result().choices
            wait_until(lambda: sum(w["restarts"] for w in pool.stats()["workers"]) > restarts
                       and all(w["state"] == "ready" for w in pool.stats()["workers"]), 300,
                       what="the killed worker's restart")


@pytest.mark.timeout(300)
def test_hf_engine_continues_a_stream_as_an_uninterrupted_run_would():
    """The engine alone, cut after each of several pieces: greedy with a stop string and n=3, a
    JSON grammar, and seeded sampling (its generator moved past the draws already made) all end
    with the uninterrupted texts, and stream only what was not delivered."""
    from mpdp.engines.base import EngineRequest, WorkerPlacement
    from mpdp.engines.hf import HFEngine
    from mpdp.models import resolve_model

    engine = HFEngine(resolve_model(mpdp.DEFAULT_MODEL), {}, WorkerPlacement(0, [], 1))

    def run(request):
        engine.add(request)
        pieces, final = [], None
        while engine.has_unfinished():
            for res in engine.step():
                if res.finished:
                    final = res
                else:
                    pieces.append(res)
        return pieces, final

    messages = [{"role": "user", "content": "Describe a cat as JSON with its name and age."}]
    for params in ({"max_tokens": 40, "temperature": 0.0, "n": 3, "stop": ["age"]},
                   {"max_tokens": 30, "temperature": 0.0, "response_format": {"type": "json_object"}},
                   {"max_tokens": 30, "temperature": 0.8, "seed": 7, "n": 2}):
        n = params.get("n", 1)
        pieces, whole = run(EngineRequest(1, messages=messages, params=params, stream=True))
        assert len(pieces) > 4
        for cut in (1, len(pieces) // 2, len(pieces) - 1):
            sent = [[sum((p.token_ids[i] for p in pieces[:cut]), []), sum(len(p.texts[i]) for p in pieces[:cut])]
                    for i in range(n)]
            more, final = run(EngineRequest(2, messages=messages, params=params, stream=True, continuation=sent))
            assert final.texts == whole.texts and final.finish_reasons == whole.finish_reasons
            assert final.completion_tokens == whole.completion_tokens
            for i in range(n):   # what it streams follows what was delivered, within the whole text
                delivered = "".join(p.texts[i] for p in pieces[:cut]) + "".join(p.texts[i] for p in more)
                assert whole.texts[i].startswith(delivered)


# -- 7: the final piece always reaches a sync Stream --------------------------------------------
def test_every_short_stream_ends_with_finished_and_its_whole_text(make_pool, monkeypatch):
    pool = make_pool(num_workers=2, engine_options={"stream_piece": 2})
    texts = [f"short stream number {i}" for i in range(300)]
    outcomes: dict[int, tuple] = {}

    def read(i):
        deltas = list(pool.stream(texts[i], max_tokens=100))
        outcomes[i] = ("".join(d.texts[0] for d in deltas), deltas[-1].finished if deltas else False)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes == {i: (text, True) for i, text in enumerate(texts)}

    # The race made certain: the dispatcher lingers after resolving a future, long enough for
    # the iterator's wait to time out with the future done. It must still get its final piece.
    resolve = PoolFuture.resolve

    def slow_resolve(self, value):
        resolve(self, value)
        threading.Event().wait(0.8)

    monkeypatch.setattr(PoolFuture, "resolve", slow_resolve)
    for text in texts[:3]:
        deltas = list(pool.stream(text, max_tokens=100))
        assert deltas and deltas[-1].finished and "".join(d.texts[0] for d in deltas) == text


# -- 8: a failed consumer ends its own stream only -----------------------------------------------
def test_an_astream_whose_event_loop_closed_ends_alone_and_the_pool_stays_healthy(make_pool):
    pool = make_pool(num_workers=1, engine_options={"faults": True, "delay_s": 3.0, "stream_piece": 1})
    other = pool.submit("another caller's request", max_tokens=100)

    async def open_and_leave():
        return await pool.astream(LONG, max_tokens=len(LONG))   # never read

    s = asyncio.run(open_and_leave())                           # its event loop is closed now
    with pytest.raises(mpdp.MpdpError, match="consumer"):
        s.future.result(timeout=30)
    assert other.result(timeout=30).text == "another caller's request"
    assert pool.state == "running"
    # The abandoned stream was aborted inside its engine, and the pool serves on.
    wait_until(lambda: pool.submit("!held").result(timeout=30).text == "", 30,
               what="the abandoned stream to leave the engine")
    assert [c.text for c in pool.generate(["a", "b", "c"], max_tokens=5)] == ["a", "b", "c"]
    s2 = pool.stream("a stream after it", max_tokens=100)
    assert "".join(d.texts[0] for d in s2) == "a stream after it"


def test_a_sink_that_raises_ends_its_own_request_only(make_pool, monkeypatch):
    pool = make_pool(num_workers=1, engine_options={"delay_s": 0.5, "stream_piece": 1})

    class BrokenQueue(queue.SimpleQueue):
        def put(self, item, block=True, timeout=None):
            raise RuntimeError("the consumer is gone")

    make_stream = mpdp.pool.Stream.__init__

    def with_a_broken_queue(self):
        make_stream(self)
        self._queue = BrokenQueue()

    monkeypatch.setattr(mpdp.pool.Stream, "__init__", with_a_broken_queue)
    s = pool.stream("a stream whose sink fails", max_tokens=100)
    monkeypatch.undo()
    futures = [pool.submit(f"request {i}", max_tokens=100) for i in range(20)]
    with pytest.raises(mpdp.MpdpError, match="consumer"):
        s.future.result(timeout=30)
    with pytest.raises(mpdp.MpdpError, match="consumer"):
        list(s)
    assert [f.result(timeout=30).text for f in futures] == [f"request {i}" for i in range(20)]
    assert pool.state == "running"


# -- 6 over HTTP (last in the file: the server lives until the module ends) -------------------------
@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--engine", "echo", "--num-workers", "2", "--served-model-name", "echo",
                      "--engine-option", "stream_piece=1", "--engine-option", "delay_s=6",
                      "--engine-option", "max_model_len=10000")
    yield s
    assert s.stop() == 0


def kill_served_worker(server) -> None:
    (w,) = [w for w in server.health()[1]["workers"] if w["in_flight"]]
    os.kill(w["pid"], signal.SIGKILL)


def test_sse_stream_continues_after_its_worker_dies(server):
    client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)
    text, killed, reasons = "", False, []
    for chunk in client.completions.create(model="echo", prompt=LONG, max_tokens=len(LONG), stream=True):
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
        if not killed and len(text) >= 40:
            kill_served_worker(server)
            killed = True
    assert killed and text == LONG and reasons[-1] == "stop" and reasons.count("stop") == 1
    wait_until(lambda: server.health()[0] == 200, 60, what="the killed worker's restart")


def test_sse_stream_that_cannot_continue_ends_with_an_error_event_then_done(server):
    body = {"model": "echo", "prompt": LONG, "max_tokens": len(LONG), "stream": True, "logprobs": 1}
    events, killed, text = [], False, ""
    with httpx.stream("POST", server.base + "/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if line[6:] != "[DONE]":
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"] if "choices" in chunk else ""
            if not killed and len(text) >= 40:
                kill_served_worker(server)
                killed = True
    assert killed and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "lost its worker" in error["message"] and "logprobs" in error["message"]
    assert LONG.startswith(text) and len(text) < len(LONG)
    wait_until(lambda: server.health()[0] == 200, 60, what="the killed worker's restart")


# -- the record a continuation is made of ---------------------------------------------------------
def test_a_continuation_and_token_ids_travel_and_bad_ones_are_refused():
    from mpdp.core.resume import Delivered
    from mpdp.engines.base import EngineRequest, EngineResult
    from mpdp.errors import ProtocolError
    from mpdp.wire import protocol

    req = EngineRequest(4, "hi", None, None, {"n": 2}, True, [[[1, 2], 3], [[], 0]])
    assert protocol.request_from_wire(protocol.request_to_wire(req)) == req
    for bad in ([[[1, "x"], 3]], [[[1], -1]], [[1, 2]], "no"):
        with pytest.raises(ProtocolError, match="continuation"):
            protocol.request_from_wire([4, "hi", None, None, {}, True, bad])
    d = Delivered()
    d.add(EngineResult(4, ["ab", "c"], finished=False, token_ids=[[7], [8, 9]]))
    d.add(EngineResult(4, ["", "d"], finished=False, token_ids=[[], [10]]))
    assert d and d.continuation() == [[[7], 2], [[8, 9, 10], 2]]
    for bad in ([[7, "x"]], [7], [[1], [2], [3]]):
        with pytest.raises(ProtocolError):
            d.add(EngineResult(4, ["e", "f"], finished=False, token_ids=bad))
    assert d.continuation() == [[[7], 2], [[8, 9, 10], 2]]      # a refused result counts nothing
