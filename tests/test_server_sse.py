"""The streamed response's events (``mpdp/server/sse.py``): content chunks made from templates
are the chunks ``openai_api.response.chunk`` describes, and deltas that waited for a busy server are
joined into fewer chunks whose text is the same."""

from __future__ import annotations

import asyncio
import json

import pytest

from mpdp.pool import Delta
from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes
from mpdp.server import sse
from mpdp.server.app import create_app

pytestmark = pytest.mark.timeout(120)
TEXTS = ["plain", "", 'quote " and \\ slash', "new\nline\ttab", "ünïcödé ✓ 🚀", "\x00\x1f control"]


@pytest.mark.parametrize("kind", [parsing.CHAT, parsing.COMPLETION])
def test_template_events_are_the_chunks_themselves(kind):
    p = parsing.Parsed(kind, 'a "quoted" model ✓', [{}], {"n": 2})
    events = sse.TextEvents(p, shapes.new_id(kind), 1_700_000_000)
    for index in (0, 1, 7):
        for text in TEXTS:
            made = events.text(index, text)
            assert made == sse.event(shapes.chunk(p, events.rid, events.created, index, text))
            assert made.startswith(b"data: ") and made.endswith(b"\n\n")
            assert json.loads(made[6:]) == shapes.chunk(p, events.rid, events.created, index, text)


class FakeStream:
    """An AsyncStream's reading side: deltas (or an error) already waiting in order."""

    def __init__(self, items):
        self.items = list(items)

    def waiting(self) -> int:
        return len(self.items)

    async def __aiter__(self):
        while self.items:
            item = self.items.pop(0)
            if isinstance(item, BaseException):
                raise item
            yield item


async def collect(streams) -> list:
    return [b[:3] async for b in sse.batches(streams)]     # (i, texts, finished)


def test_waiting_deltas_are_joined_per_choice():
    one = FakeStream([Delta(["ab", "x"]), Delta(["cd", ""]), Delta(["e", "yz"], finished=True)])
    assert asyncio.run(collect([one])) == [(0, ["abcde", "xyz"], True)]


def test_several_streams_are_each_joined_and_all_read():
    streams = [FakeStream([Delta(["a"]), Delta(["b"], finished=True)]),
               FakeStream([Delta(["c"]), Delta(["d"]), Delta([""], finished=True)])]
    got = asyncio.run(collect(streams))
    assert sorted(got) == [(0, ["ab"], True), (1, ["cd"], True)]


def test_text_read_before_a_failure_is_given_out_then_the_error_raised():
    stream = FakeStream([Delta(["ab"]), Delta(["cd"]), RuntimeError("the worker died")])
    got = []

    async def main():
        async for b in sse.batches([stream]):
            got.append(b[:3])

    with pytest.raises(RuntimeError, match="the worker died"):
        asyncio.run(main())
    assert got == [(0, ["abcd"], False)]


def test_deltas_waiting_in_a_real_stream_come_as_one(make_pool):
    pool = make_pool(num_workers=1, engine_options={"delay_s": 0.3, "stream_piece": 1})
    text = "every piece waits for the reader"
    whole = pool.submit(text, max_tokens=100).result(timeout=30).text

    async def main():
        s = await pool.astream(text, max_tokens=100)
        while not s.future.done():             # every piece and the final result have arrived
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert s.waiting() > len(text) // 2       # the engine sent one piece per step
        return await collect([s])

    assert asyncio.run(main()) == [(0, [whole], True)]


def test_a_slow_reader_gets_fewer_chunks_that_join_to_the_same_text(make_pool):
    """The whole app over ASGI, its sends slowed as a client's congested connection would: the
    engine's one-character pieces pile up between two sends and go out joined."""
    pool = make_pool(num_workers=1, engine_options={"delay_s": 0.3, "stream_piece": 1})
    app = create_app(pool, "m")
    text = "a stream read slowly still joins to the same text"
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 100, "stream": True,
            "stream_options": {"include_usage": True}}

    async def main() -> list[dict]:
        raw = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                                     (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        received, done = [], asyncio.Event()

        async def receive():
            if not received:
                received.append(True)
                return {"type": "http.request", "body": raw, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        out = bytearray()

        async def send(message):
            if message["type"] == "http.response.body":
                out.extend(message.get("body", b""))
                await asyncio.sleep(0.03)            # the slow client
                if not message.get("more_body"):
                    done.set()

        await app(scope, receive, send)
        return [json.loads(line[6:]) for line in out.decode().split("\n\n")
                if line.startswith("data: ") and line != "data: [DONE]"]

    chunks = asyncio.run(main())
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(t or "" for t in content) == text
    pieces = [t for t in content if t]
    assert 1 <= len(pieces) < len(text) // 3              # one per engine step without the joining
    assert chunks[-1]["usage"]["completion_tokens"] == len(text)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
