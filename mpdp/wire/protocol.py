"""The wire protocol between the dispatcher (ROUTER) and the workers (DEALER).

Every frame is two parts: a 2-byte header ``[version, tag]`` and one msgpack body.
Nothing else in mpdp builds or parses frames, and nothing here is pickled: msgpack
carries only plain data, so a hostile peer can at worst send garbage, never code, and
every record is checked on the way in (a malformed one is a ProtocolError, never a crash).

    worker -> dispatcher                      dispatcher -> worker
    READY      Ready {index, pid, capacity..} SUBMIT    [request, ...]   (a micro-batch)
    HEARTBEAT  Heartbeat {steps, call, busy_s} ABORT    [request_id, ...]
    STEPS      {steps, tokens, running,      (what the engine's steps did since the last STEPS:
                busy_s, finished}             the measurements behind each worker's batch limit)
    RESULTS    [result, ...]                  PING      {}   (the dispatcher is alive)
    DEAD       {error}   (sent before exiting SHUTDOWN  {}
               on an engine failure)

A worker speaks over two DEALER sockets, each owned by one thread: its data socket (READY,
RESULTS, STEPS, DEAD; SUBMIT, ABORT, SHUTDOWN) and its beat socket (HEARTBEAT; PING), whose identity
is the data socket's plus ``BEAT_SUFFIX``. Liveness (the process runs) and progress (its
engine's current call returns) are separate facts: HEARTBEATs keep coming while an engine step
computes, and say which call the engine is in and for how long.

Requests and results travel as msgpack arrays in a fixed field order (positional, like
vLLM's array-like structs: smaller and faster than maps). A list of records larger than
``MAX_FRAME_BYTES`` is split over several frames (``encode_batches``); one record that does
not fit alone cannot travel, and the sender fails that request alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.errors import ProtocolError

VERSION = 5        # 5: requests carry a stream's continuation, partial results their token ids


class Tag(enum.IntEnum):
    READY = 1
    HEARTBEAT = 2
    RESULTS = 3
    DEAD = 4
    STEPS = 5
    SUBMIT = 10
    ABORT = 11
    SHUTDOWN = 12
    PING = 13


# A frame larger than this is refused on receipt (and by ZMQ_MAXMSGSIZE on the sockets).
MAX_FRAME_BYTES = 64 * 2**20

# The beat socket's identity is the worker's identity plus this (see the module docstring).
BEAT_SUFFIX = b"+beat"

_HEADERS = {tag: bytes((VERSION, tag)) for tag in Tag}
_TAGS = {int(t): t for t in Tag}


@dataclass(slots=True, frozen=True)
class Ready:
    """What a worker reports once its engine is loaded."""

    index: int
    pid: int
    capacity: int
    engine: str
    max_model_len: int | None = None
    gpus: list | None = None
    kv_cache_tokens: int | None = None        # what the engine's KV cache holds (vLLM)
    node: str | None = None                   # the host it runs on (for launchers across machines)
    step_timeout: float | None = None         # the engine's budget for one call (Engine.step_timeout)
    extra: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_wire(cls, body: Any) -> "Ready":
        if not isinstance(body, dict):
            raise ProtocolError(f"READY body must be a map, not {type(body).__name__}")
        try:
            ready = cls(**{k: v for k, v in body.items() if k in cls.__slots__})
        except TypeError as exc:
            raise ProtocolError(f"bad READY: {exc}") from None
        if not (_is_int(ready.index) and _is_int(ready.pid) and _is_int(ready.capacity)):
            raise ProtocolError("READY index, pid and capacity must be ints")
        budget = ready.step_timeout
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not budget > 0):
            raise ProtocolError(f"READY step_timeout must be a number > 0, not {budget!r}")
        return ready


ENGINE_CALLS = ("add", "step", "abort")


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """A worker's liveness and its engine's progress: how many steps have returned, and the
    engine call in progress (``call``, one of ENGINE_CALLS, or None when the engine is idle)
    with the seconds it has run so far (a duration: the two machines' clocks never meet)."""

    steps: int = 0
    call: str | None = None
    busy_s: float = 0.0

    def to_wire(self) -> dict:
        return {"steps": self.steps, "call": self.call, "busy_s": self.busy_s}

    @classmethod
    def from_wire(cls, body: Any) -> "Heartbeat":
        if not isinstance(body, dict):
            raise ProtocolError(f"HEARTBEAT body must be a map, not {type(body).__name__}")
        steps, call, busy = body.get("steps", 0), body.get("call"), body.get("busy_s", 0.0)
        if not _is_int(steps) or call not in (None, *ENGINE_CALLS) or isinstance(busy, bool) \
                or not isinstance(busy, (int, float)) or not busy >= 0:
            raise ProtocolError(f"bad HEARTBEAT {body!r}: steps must be an int, call one of "
                                f"{ENGINE_CALLS} or None, busy_s a number >= 0")
        return cls(steps, call, float(busy))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pack(body: Any) -> bytes:
    # strict: no surrogates (msgpack refuses them), no unknown types -> TypeError naming the value.
    return msgpack.packb(body, use_bin_type=True)


def encode(tag: Tag, body: Any) -> list[bytes]:
    """The frames for one message (without the ROUTER identity frame)."""
    return [_HEADERS[tag], _pack(body)]


def encode_batches(tag: Tag, items: list, limit: int = MAX_FRAME_BYTES) -> tuple[list[list[bytes]], list[int]]:
    """Messages carrying ``items`` (wire records), each under ``limit`` bytes.

    Returns (messages, too_big): the positions of items that do not fit a frame even alone.
    The common case (everything fits) packs once; only an oversized list is halved.
    """
    out: list[list[bytes]] = []
    too_big: list[int] = []
    # A stack, not a recursive closure: a nested function that calls itself is a reference
    # cycle (function -> cell -> function) that kept every batch's records alive until the
    # cycle collector ran, one collection's worth of garbage per message.
    pending = [(0, len(items))] if items else []
    while pending:
        lo, hi = pending.pop()
        body = _pack(items[lo:hi])
        if len(body) <= limit:
            out.append([_HEADERS[tag], body])
        elif hi - lo == 1:
            too_big.append(lo)
        else:
            mid = (lo + hi) // 2
            pending += ((mid, hi), (lo, mid))    # the first half on top: messages stay in order
    return out, too_big


def decode(frames: list[bytes]) -> tuple[Tag, Any]:
    """(tag, body) of a message; ProtocolError for anything that is not a valid mpdp frame."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    header, body = frames
    if len(header) != 2:
        raise ProtocolError(f"bad header of {len(header)} bytes")
    version, tag = header[0], header[1]
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    if tag not in _TAGS:
        raise ProtocolError(f"unknown message tag {tag}")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        return _TAGS[tag], msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable {_TAGS[tag].name} body: {exc}") from exc


def _list_body(tag: Tag, body: Any) -> list:
    if not isinstance(body, list):
        raise ProtocolError(f"{tag.name} body must be a list, not {type(body).__name__}")
    return body


# -- requests ----------------------------------------------------------------------------------
def request_to_wire(req: EngineRequest) -> list:
    return [req.id, req.prompt, req.messages, req.prompt_token_ids, req.params, req.stream, req.continuation]


def request_from_wire(item: Any) -> EngineRequest:
    if (not isinstance(item, list) or len(item) != 7 or not _is_int(item[0]) or not isinstance(item[4], dict)
            or not (item[6] is None or _is_continuation(item[6]))):
        raise ProtocolError("a SUBMIT item must be [id, prompt, messages, prompt_token_ids, params, stream, "
                            "continuation (null or [[token ids], characters] per choice)]")
    return EngineRequest(*item)


def _is_continuation(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], list) and all(map(_is_int, c[0]))
        and _is_int(c[1]) and c[1] >= 0 for c in value)


def submit_items(body: Any) -> list:
    return _list_body(Tag.SUBMIT, body)


def abort_ids(body: Any) -> list[int]:
    ids = _list_body(Tag.ABORT, body)
    if not all(_is_int(i) for i in ids):
        raise ProtocolError("ABORT body must be a list of request ids")
    return ids


# -- step measurements -------------------------------------------------------------------------
STEP_FIELDS = ("steps", "tokens", "running", "busy_s", "finished")
_STEP_COUNTS = ("steps", "tokens", "running", "finished")


def steps_from_wire(body: Any) -> dict:
    """A STEPS body: five non-negative numbers (counts are ints, busy_s seconds)."""
    if not isinstance(body, dict) or not all(k in body for k in STEP_FIELDS):
        raise ProtocolError(f"a STEPS body must be a map with {', '.join(STEP_FIELDS)}")
    out = {k: body[k] for k in STEP_FIELDS}
    if not (all(_is_int(out[k]) and out[k] >= 0 for k in _STEP_COUNTS)
            and isinstance(out["busy_s"], (int, float)) and not isinstance(out["busy_s"], bool)
            and 0 <= out["busy_s"] < float("inf")):
        raise ProtocolError(f"bad STEPS body {out!r}")
    return out


# -- results -----------------------------------------------------------------------------------
def result_to_wire(res: EngineResult) -> list:
    return [res.id, res.texts, res.finish_reasons, res.prompt_tokens, res.completion_tokens,
            res.logprobs, res.error_type, res.error, res.finished, res.traceback, res.cached_tokens,
            res.token_ids]


def result_from_wire(item: Any) -> EngineResult:
    # On the dispatcher's hot path (once per result): exact type tests, no helper calls.
    # msgpack decodes ints as int and arrays as list, never subclasses, so `type(...) is` is exact.
    if (type(item) is not list or len(item) != 12 or type(item[0]) is not int
            or type(item[1]) is not list or type(item[2]) is not list
            or type(item[3]) is not int or type(item[4]) is not int
            or (item[10] is not None and type(item[10]) is not int)):
        raise ProtocolError("a RESULTS item must be [id, texts, finish_reasons, prompt_tokens, "
                            "completion_tokens, logprobs, error_type, error, finished, traceback, cached_tokens, "
                            "token_ids]")
    return EngineResult(*item)


def results_from_wire(body: Any):
    """The results of a RESULTS body, one at a time (a bad item raises when it is reached: the
    ones before it were valid and are kept; the sender is dropped for the rest)."""
    return map(result_from_wire, _list_body(Tag.RESULTS, body))


def check_encodable(value: Any, what: str) -> int:
    """Size in bytes of ``value`` on the wire; TypeError/ValueError naming ``what`` when it can't travel."""
    try:
        return len(_pack(value))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} contains text that is not valid UTF-8 (lone surrogate?): {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} is not serialisable for the wire: {exc}") from None
