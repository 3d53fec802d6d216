"""Streams that outlive their worker: what a streamed request has delivered, and how it goes on.

A streamed request's partial results carry, per choice, the ids of the tokens they cover
(``EngineResult.token_ids``). The dispatcher adds them up in a ``Delivered`` record, with the
characters of text handed to the consumer. When the worker dies, the request is sent again with
that record as its ``continuation``: the engine takes the delivered tokens as each choice's first
generated tokens (after the prompt, counted in ``max_tokens``, seen by stop strings), decodes what
follows in their context, so the seam has no spurious space or merged word, and streams only text
past the delivered characters. The final result still carries whole texts. A worker death thus
costs a stream nothing: each character reaches the consumer once, and the text is one answer (at
temperature 0, the text of an uninterrupted run).

Restarting such a stream from its first token would show the consumer its text twice (with
sampling, two answers spliced). So a stream that cannot continue ends with ``StreamInterrupted``
once it has delivered anything (``why_not`` says why); one that has delivered nothing is retried
as any request is.

Cost: one list extend per choice per partial result, on the dispatcher thread; nothing for
requests that are not streamed.
"""

from __future__ import annotations

from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.errors import ProtocolError


class Delivered:
    """Per choice: the token ids streamed so far and the characters of text delivered."""

    __slots__ = ("tokens", "chars")

    def __init__(self):
        self.tokens: list[list[int]] = []
        self.chars: list[int] = []

    def add(self, res: EngineResult) -> None:
        """Count a partial result handed to the consumer. A malformed ``token_ids`` is the
        worker's protocol violation: refused before anything is counted."""
        ids = res.token_ids
        if ids is not None and (type(ids) is not list or len(ids) > len(res.texts) or not all(
                type(t) is list and all(type(i) is int for i in t) for t in ids)):
            raise ProtocolError("token_ids of a partial result must be a list of token id lists, one per choice")
        if len(self.chars) < len(res.texts):
            grow = len(res.texts) - len(self.chars)
            self.chars.extend([0] * grow)
            self.tokens.extend([] for _ in range(grow))
        for i, text in enumerate(res.texts):
            self.chars[i] += len(text)
        if ids:
            for mine, new in zip(self.tokens, ids):
                mine.extend(new)

    def __bool__(self) -> bool:
        return any(self.chars) or any(self.tokens)

    def continuation(self) -> list[list]:
        """``EngineRequest.continuation``: ``[token ids, characters]`` per choice."""
        return [[list(t), c] for t, c in zip(self.tokens, self.chars)]


def why_not(request: EngineRequest, delivered: Delivered, engine_check) -> str | None:
    """Why this stream cannot continue from what it delivered, or None when it can.
    ``engine_check``: the engine's ``cannot_continue`` (None: it continues no stream)."""
    if engine_check is None:
        return "its engine cannot continue a stream from the tokens already delivered"
    if request.params.get("logprobs") is not None:
        return ("it asked for logprobs, and those of the tokens already streamed died with the worker "
                "(they come with a stream's last piece)")
    if any(c and not t for t, c in zip(delivered.tokens, delivered.chars)):
        return "its engine streamed text without the token ids it covers"
    return engine_check(request.params or {})
