"""The one logprob record every engine produces, so that no consumer branches on the engine.

``Completion.logprobs`` holds, per choice, one record per generated token::

    {"token_id": 57, "token": " like", "bytes": [32, 108, 105, 107, 101], "logprob": -0.31,
     "top_logprobs": [{"token_id", "token", "bytes", "logprob"}, ...]}   # k alternatives, best first

``bytes`` are the token's own bytes. A token that is a piece of one multi-byte character (an
emoji is three SmolLM2 tokens) has the bytes of that piece, not those of U+FFFD, and its
``token`` is then ``"bytes: \\xf0\\x9f"`` (OpenAI's spelling for text that is not UTF-8 on
its own: the bytes that are not, escaped), so that two such pieces never share a name (they
are keys of a completion's ``top_logprobs``). Plain dicts: the record travels as msgpack.
"""

from __future__ import annotations

from typing import Any, Callable


def token_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + raw.decode("utf-8", "backslashreplace")


def record(token_id: int, raw: bytes, logprob: float | None,
           top: list[tuple[int, bytes, float]] | None = None) -> dict[str, Any]:
    """One generated token's record; ``top`` is (token id, bytes, logprob) of the alternatives."""
    return {"token_id": token_id, "token": token_text(raw), "bytes": list(raw), "logprob": logprob,
            "top_logprobs": [{"token_id": t, "token": token_text(b), "bytes": list(b), "logprob": lp}
                             for t, b, lp in (top or ())]}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet (every byte is one printable character in a token's piece).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """A function token id -> the token's own bytes, for a Hugging Face tokenizer (cached).

    Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): the piece's characters map back to bytes.
    SentencePiece with byte fallback (Llama 2, Mistral): ``<0xF0>`` is one byte, ``▁`` a space.
    Added tokens (``<|im_end|>``) are their own text. Anything else: the decoded text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = str(getattr(backend, "decoder", "") or "")
    byte_level, sentencepiece = "ByteLevel" in decoder, "ByteFallback" in decoder or "Metaspace" in decoder
    added = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    cache: dict[int, bytes] = {}

    def of(token_id: int) -> bytes:
        raw = cache.get(token_id)
        if raw is not None:
            return raw
        piece = added.get(token_id)
        if piece is not None:
            raw = piece.encode()
        else:
            piece = tokenizer.convert_ids_to_tokens(token_id)
            if not isinstance(piece, str):
                raw = tokenizer.decode([token_id]).encode()
            elif byte_level and all(c in _BYTE_OF_CHAR for c in piece):
                raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
            elif sentencepiece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            elif sentencepiece:
                raw = piece.replace("\u2581", " ").encode()
            else:
                raw = tokenizer.decode([token_id]).encode()
        cache[token_id] = raw
        return raw

    return of
