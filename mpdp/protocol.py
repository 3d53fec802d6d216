"""The wire protocol between the dispatcher (ROUTER) and the workers (DEALER).

Every frame is two parts: a 2-byte header ``[version, tag]`` and one msgpack body.
Nothing else in mpdp builds or parses frames, and nothing here is pickled: msgpack
carries only plain data, so a hostile peer can at worst send garbage, never code.

    worker -> dispatcher                     dispatcher -> worker
    READY      {index, pid, capacity, ...}   SUBMIT    [request, ...]   (a micro-batch)
    HEARTBEAT  {in_flight, steps}            ABORT     [request_id, ...]
    RESULTS    [result, ...]                 SHUTDOWN  {}
    DEAD       {error}   (sent before exiting on an engine failure)

Requests and results travel as msgpack arrays in the field order of ``REQUEST_FIELDS`` and
``RESULT_FIELDS`` (positional, like vLLM's array-like structs: smaller and faster than maps).
"""

from __future__ import annotations

from typing import Any

import msgpack

from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.errors import ProtocolError

VERSION = 1

# One-byte message tags.
READY = 1
HEARTBEAT = 2
RESULTS = 3
DEAD = 4
SUBMIT = 10
ABORT = 11
SHUTDOWN = 12

TAG_NAMES = {READY: "READY", HEARTBEAT: "HEARTBEAT", RESULTS: "RESULTS", DEAD: "DEAD",
             SUBMIT: "SUBMIT", ABORT: "ABORT", SHUTDOWN: "SHUTDOWN"}

# A frame larger than this is refused on receipt (and by ZMQ_MAXMSGSIZE on the sockets).
MAX_FRAME_BYTES = 64 * 2**20

REQUEST_FIELDS = ("id", "prompt", "messages", "prompt_token_ids", "params")
RESULT_FIELDS = ("id", "texts", "finish_reasons", "prompt_tokens", "completion_tokens",
                 "logprobs", "error_type", "error")

_HEADERS = {tag: bytes((VERSION, tag)) for tag in TAG_NAMES}


def _pack(body: Any) -> bytes:
    # strict: no surrogates (msgpack refuses them), no unknown types -> TypeError naming the value.
    return msgpack.packb(body, use_bin_type=True)


def encode(tag: int, body: Any) -> list[bytes]:
    """The frames for one message (without the ROUTER identity frame)."""
    return [_HEADERS[tag], _pack(body)]


def decode(frames: list[bytes]) -> tuple[int, Any]:
    """(tag, body) of a message; ProtocolError for anything that is not a valid mpdp frame."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    header, body = frames
    if len(header) != 2:
        raise ProtocolError(f"bad header of {len(header)} bytes")
    version, tag = header[0], header[1]
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    if tag not in TAG_NAMES:
        raise ProtocolError(f"unknown message tag {tag}")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        return tag, msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable {TAG_NAMES[tag]} body: {exc}") from exc


def request_to_wire(req: EngineRequest) -> list:
    return [req.id, req.prompt, req.messages, req.prompt_token_ids, req.params]


def request_from_wire(item: list) -> EngineRequest:
    return EngineRequest(*item)


def result_to_wire(res: EngineResult) -> list:
    return [res.id, res.texts, res.finish_reasons, res.prompt_tokens, res.completion_tokens,
            res.logprobs, res.error_type, res.error]


def result_from_wire(item: list) -> EngineResult:
    return EngineResult(*item)


def check_encodable(value: Any, what: str) -> int:
    """Size in bytes of ``value`` on the wire; TypeError/ValueError naming ``what`` when it can't travel."""
    try:
        return len(_pack(value))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} contains text that is not valid UTF-8 (lone surrogate?): {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} is not serialisable for the wire: {exc}") from None
