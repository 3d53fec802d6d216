"""Server-sent events of a streamed response, made cheaply: a streamed token's cost in Python
decides the server's throughput when many clients stream at once.

- ``event(obj)``: one ``data: {json}`` event.
- ``TextEvents``: the content chunks of one response, each from a template cut once per choice
  out of ``openai_api.response.chunk``'s own output (so the two shapes cannot drift apart); per delta
  only the new text is JSON-encoded.
- ``Started``: a pool stream whose first delta (or failure) was awaited before the response
  began, so that a request its engine refuses when it takes it (a prompt over the context) is
  answered with its own status, as unstreamed, rather than a 200 and an error event.
- ``batches(streams)``: the pool streams' deltas as they come, those of one stream that are
  already waiting joined into one. A server behind the engines then catches up with one event
  per stream instead of one per engine step, as vLLM's server does (its output collector merges
  the deltas its consumer has not taken yet); the joined text is the same.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes

DONE = b"data: [DONE]\n\n"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_MARK = "\x00mpdp-text\x00"          # a text no model name, id or number encodes to
_MARK_JSON = _encode(_MARK)


def event(obj: Any) -> bytes:
    return b"data: " + _encode(obj).encode() + b"\n\n"


class TextEvents:
    """The content events of one streamed response (one id, created time and model)."""

    def __init__(self, p: parsing.Parsed, rid: str, created: int):
        self.p, self.rid, self.created = p, rid, created
        self._templates: dict[int, tuple[bytes, bytes]] = {}

    def text(self, index: int, text: str) -> bytes:
        """What ``event(shapes.chunk(p, rid, created, index, text))`` gives, for less."""
        parts = self._templates.get(index)
        if parts is None:
            parts = self._templates[index] = self._template(index)
        return parts[0] + _encode(text).encode() + parts[1]

    def _template(self, index: int) -> tuple[bytes, bytes]:
        whole = event(shapes.chunk(self.p, self.rid, self.created, index, _MARK))
        before, mark, after = whole.partition(_MARK_JSON.encode())
        if not mark or _MARK_JSON.encode() in after:
            raise AssertionError("the chunk template's placeholder is not unique")
        return before, after


class Started:
    """A pool stream read up to its first delta (``await start()``), then read as the stream itself."""

    def __init__(self, stream):
        self.stream, self.future = stream, stream.future
        self._deltas = stream.__aiter__()
        self._first = None

    async def start(self) -> None:
        """Wait for the first delta; raises the request's error if it fails before one."""
        try:
            self._first = await self._deltas.__anext__()
        except StopAsyncIteration:
            pass

    def cancel(self) -> bool:
        return self.stream.cancel()

    def waiting(self) -> int:
        return self.stream.waiting() + (self._first is not None)

    async def __aiter__(self):
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for delta in self._deltas:
            yield delta


async def batches(streams: list) -> AsyncIterator[tuple[int, list[str], bool, Any]]:
    """``(i, texts, finished, last)``: stream ``i``'s new text per choice, joined over the deltas
    that were waiting, and the last of them (its token counts); one stream (the usual case) is
    read directly, without a task."""
    if len(streams) == 1:
        async for texts, finished, last in _joined(streams[0]):
            yield 0, texts, finished, last
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for texts, finished, last in _joined(s):
                queue.put_nowait((i, texts, finished, last, None))
        except BaseException as exc:           # noqa: B036 - handed to the reader, which raises it
            queue.put_nowait((i, None, True, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, texts, finished, last, exc = await queue.get()
            if exc is not None:
                raise exc
            yield i, texts, finished, last
            if finished:
                left -= 1
    finally:
        for t in tasks:
            t.cancel()


async def _joined(stream) -> AsyncIterator[tuple[list[str], bool, Any]]:
    """One ``AsyncStream``'s deltas, those already waiting joined (texts per choice, in order),
    with the last delta joined. Text read before the stream fails is still given out, then the
    error raised."""
    texts: list[str] | None = None
    last = None
    try:
        async for delta in stream:
            last = delta
            if texts is None:
                texts = delta.texts
            else:
                texts = _concat(texts, delta.texts)
            if delta.finished or not stream.waiting():
                yield texts, delta.finished, delta
                texts = None
    except Exception:
        if texts is not None:
            yield texts, False, last
        raise


def _concat(a: list[str], b: list[str]) -> list[str]:
    if len(a) < len(b):
        a = a + [""] * (len(b) - len(a))
    return [t + (b[j] if j < len(b) else "") for j, t in enumerate(a)]
