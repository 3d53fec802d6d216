"""The wire format alone."""

import msgpack
import pytest

from mpdp.wire import protocol
from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.errors import ProtocolError


def test_request_round_trip():
    req = EngineRequest(7, None, [{"role": "user", "content": "hé"}], None, {"max_tokens": 5, "stop": ["\n"]})
    tag, body = protocol.decode(protocol.encode(protocol.Tag.SUBMIT, [protocol.request_to_wire(req)]))
    assert tag == protocol.Tag.SUBMIT
    assert protocol.request_from_wire(body[0]) == req


def test_result_round_trip():
    res = EngineResult(3, ["a", "b"], ["stop", "length"], 4, 9, [[-0.1], [-0.2]])
    tag, body = protocol.decode(protocol.encode(protocol.Tag.RESULTS, [protocol.result_to_wire(res)]))
    assert protocol.result_from_wire(body[0]) == res


def test_other_version_is_refused():
    frames = protocol.encode(protocol.Tag.READY, {})
    frames[0] = bytes((protocol.VERSION + 1, protocol.Tag.READY))
    with pytest.raises(ProtocolError, match="version"):
        protocol.decode(frames)


@pytest.mark.parametrize("frames, message", [
    ([b"\x01"], "expected 2 frames"),
    ([b"\x01\x02\x03", b""], "bad header"),
    ([bytes((protocol.VERSION, 99)), msgpack.packb(1)], "unknown message tag"),
    ([bytes((protocol.VERSION, protocol.Tag.RESULTS)), b"\xc1"], "undecodable"),
])
def test_malformed_frames(frames, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.decode(frames)


def test_oversized_frame_is_refused(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME_BYTES", 100)
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(protocol.encode(protocol.Tag.RESULTS, ["x" * 200]))


def test_no_pickle_on_the_wire():
    class Thing:
        pass
    with pytest.raises(TypeError, match="not serialisable"):
        protocol.check_encodable({"x": Thing()}, "the request")


def test_lone_surrogate_is_a_value_error():
    with pytest.raises(ValueError, match="UTF-8"):
        protocol.check_encodable("a\ud800b", "the request")


def test_encode_batches_splits_in_order_and_flags_what_cannot_fit():
    items = [["x" * 40, i] for i in range(10)] + [["y" * 500, 10]] + [["z", 11]]
    messages, too_big = protocol.encode_batches(protocol.Tag.RESULTS, items, limit=200)
    assert too_big == [10]
    got = [rec for frames in messages for rec in msgpack.unpackb(frames[1])]
    assert got == [list(r) for r in items[:10]] + [["z", 11]]
    assert all(len(frames[1]) <= 200 for frames in messages) and len(messages) > 1


def test_encode_batches_leaves_no_reference_cycle():
    # A cycle would keep each message's records alive until the cycle collector ran: garbage
    # that made the dispatcher's collections cost a fifth of its time in batch runs.
    import gc
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        protocol.encode_batches(protocol.Tag.RESULTS, [["r" * 50, i] for i in range(100)], limit=300)
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


def test_new_completion_is_the_dataclass_made_faster():
    # The dispatcher's fast constructor must stay field-for-field what Completion(...) makes.
    import dataclasses

    from mpdp.requests import Completion, new_completion

    args = ("hi", "stop", 3, 2, 1, ["hi", "ho"], ["stop", "length"], [[{"t": 1}]], 7)
    made = new_completion(*args)
    assert type(made) is Completion and made == Completion(*args)
    assert [f.name for f in dataclasses.fields(Completion)] == list(Completion.__slots__)
    assert new_completion(*args[:7]) == Completion(*args[:7])       # the defaults too
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.text = "x"
