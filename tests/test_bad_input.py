"""Bad input from callers and from the wire: each fails alone, with an error naming what is
wrong, and the next good request is served. Also the wire's safety: private ipc folder,
loopback tcp, CurveZMQ, frames from strangers dropped and counted."""

from __future__ import annotations

import os
import stat
import time

import pytest
import zmq

import mpdp
from mpdp.wire import protocol
from mpdp.wire.transport import CurveKeys, Transport, connect_dealer
from conftest import FAST, restarts, wait_until

pytestmark = pytest.mark.usefixtures("no_child_left")

CONTEXT = 64          # the echo engine's context in this file, in characters


@pytest.fixture(scope="module")
def pool():
    with mpdp.Pool(engine="echo", num_workers=2, engine_options={"max_model_len": CONTEXT}, **FAST) as pool:
        yield pool


def serves(pool) -> bool:
    return pool.submit("good").result(timeout=10).text == "good"


HUGE = "x" * (protocol.MAX_FRAME_BYTES // 2 + 1)

# (keywords to submit, the error raised at submit, text naming the field)
BAD_SUBMITS = [
    (dict(prompt=123), TypeError, "prompt must be a string, not int"),
    (dict(prompt=b"bytes"), TypeError, "prompt must be a string, not bytes"),
    (dict(prompt=None), ValueError, "exactly one of prompt, messages or prompt_token_ids .got none"),
    (dict(prompt=""), ValueError, "prompt is empty"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), ValueError, "got prompt, messages"),
    (dict(messages=[]), ValueError, "messages must be a non-empty list"),
    (dict(messages="hi"), ValueError, "messages must be a non-empty list"),
    (dict(messages=[{"content": "hi"}]), ValueError, r"messages\[0\] has no 'role'"),
    (dict(messages=[{"role": "user"}]), ValueError, r"messages\[0\] has no 'content'"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), ValueError, "unknown role 'wizard'"),
    (dict(messages=[{"role": "user", "content": 5}]), TypeError, r"messages\[0\].content must be a string"),
    (dict(messages=["hi"]), TypeError, r"messages\[0\] must be a dict"),
    (dict(prompt="hi", max_tokens=0), ValueError, "max_tokens must be between 1 and"),
    (dict(prompt="hi", max_tokens=-5), ValueError, "max_tokens must be between 1 and"),
    (dict(prompt="hi", max_tokens=10**12), ValueError, "max_tokens must be between 1 and"),
    (dict(prompt="hi", max_tokens="5"), TypeError, "max_tokens must be an int"),
    (dict(prompt="hi", temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(prompt="hi", temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(prompt="hi", top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(prompt="hi", top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(prompt="hi", n=0), ValueError, "n must be between 1 and"),
    (dict(prompt="hi", bogus=1), TypeError, "unknown sampling keyword 'bogus'"),
    (dict(prompt="lone \ud800 surrogate"), ValueError, "not valid UTF-8"),
    (dict(messages=[{"role": "user", "content": "\udfff"}]), ValueError, "not valid UTF-8"),
    (dict(prompt="hi", chat_template_kwargs={"x": object()}), TypeError, "not serialisable"),
    (dict(prompt="hi", timeout=-1), ValueError, "timeout must be a positive number"),
    (dict(prompt=HUGE), ValueError, "bytes on the wire"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs, error, text", BAD_SUBMITS,
                         ids=[f"{i}-{text[:24]}" for i, (_, _, text) in enumerate(BAD_SUBMITS)])
def test_bad_request_raises_at_submit_naming_the_field(pool, kwargs, error, text):
    before = pool.stats()["submitted"]
    with pytest.raises(error, match=text):
        pool.submit(**kwargs)
    assert pool.stats()["submitted"] == before       # it never reached the pool
    assert serves(pool)


@pytest.mark.timeout(30)
def test_one_bad_item_refuses_the_whole_batch_before_anything_is_sent(pool):
    before = pool.stats()["submitted"]
    with pytest.raises(TypeError, match="prompt must be a string"):
        pool.generate(["fine", {"prompt": 42}, "also fine"])
    assert pool.stats()["submitted"] == before
    assert [c.text for c in pool.generate(["fine", "also fine"])] == ["fine", "also fine"]


@pytest.mark.timeout(30)
def test_a_prompt_longer_than_the_context_fails_alone_in_the_engine(pool):
    assert {w["max_model_len"] for w in pool.stats()["workers"]} == {CONTEXT}
    before = restarts(pool)
    good = [pool.submit(f"short {i}", max_tokens=8) for i in range(20)]
    long = pool.submit("y" * CONTEXT, max_tokens=8)
    with pytest.raises(mpdp.ContextWindowExceededError, match=f"context of {CONTEXT} tokens") as info:
        long.result(timeout=10)
    assert isinstance(info.value, ValueError)         # callers may catch it as a ValueError
    assert [f.result(timeout=10).text for f in good] == [f"short {i}" for i in range(20)]
    assert restarts(pool) == before
    assert serves(pool)


# ─── Frames from strangers ───────────────────────────────────────────────────


@pytest.fixture
def dealer(pool):
    """``dealer(identity, curve=None, endpoint=None)``: a raw DEALER on the pool's endpoint."""
    ctx = zmq.Context()
    socks = []

    def make(identity: bytes, curve=None, endpoint=None):
        sock = connect_dealer(ctx, endpoint or pool._dispatcher.transport.endpoint, identity, curve)
        socks.append(sock)
        return sock

    yield make
    for s in socks:
        s.close(linger=0)
    ctx.term()


def dropped(pool) -> int:
    return pool.stats()["dropped_frames"]


def no_answer(sock, wait: float = 0.3) -> bool:
    return sock.poll(int(wait * 1000)) == 0


BAD_FRAMES = [
    ("version 99", [bytes((99, protocol.Tag.RESULTS)), protocol._pack([])]),
    ("unknown tag", [bytes((protocol.VERSION, 77)), protocol._pack({})]),
    ("one frame", [bytes((protocol.VERSION, protocol.Tag.HEARTBEAT))]),
    ("three frames", [bytes((protocol.VERSION, protocol.Tag.HEARTBEAT)), b"", b""]),
    ("not msgpack", [bytes((protocol.VERSION, protocol.Tag.RESULTS)), b"\xc1\xc1\xc1"]),
    ("oversized", [bytes((protocol.VERSION, protocol.Tag.RESULTS)), b"\x00" * (protocol.MAX_FRAME_BYTES + 1)]),
    ("a valid READY", protocol.encode(protocol.Tag.READY, {"index": 0, "capacity": 10, "pid": 1})),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frames", [f for _, f in BAD_FRAMES], ids=[name for name, _ in BAD_FRAMES])
def test_frames_from_an_unknown_identity_are_dropped_and_counted(pool, dealer, frames):
    sock = dealer(b"stranger")
    before, restarted = dropped(pool), restarts(pool)
    sock.send_multipart(frames)
    wait_until(lambda: dropped(pool) == before + 1, 5, what="the frame to be counted as dropped")
    assert no_answer(sock)
    assert serves(pool)
    assert all(w["state"] == "ready" for w in pool.stats()["workers"]) and restarts(pool) == restarted


@pytest.mark.timeout(30)
def test_a_frame_beyond_the_socket_limit_only_disconnects_its_sender(pool, dealer):
    sock = dealer(b"flooder")
    sock.send_multipart([bytes((protocol.VERSION, protocol.Tag.RESULTS)),
                         b"\x00" * (protocol.MAX_FRAME_BYTES + 8192)])   # over ZMQ_MAXMSGSIZE
    assert no_answer(sock, 0.5)
    assert serves(pool)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("socket", ["identity", "beat_identity"])
def test_a_live_workers_identity_cannot_be_taken_over(pool, dealer, socket):
    # ZeroMQ refuses a second peer with an identity in use: the impostor's frames never arrive.
    # (A frame other than HEARTBEAT on a beat socket would be a protocol violation anyway.)
    worker = pool.stats()["workers"][0]
    impostor = dealer(getattr(pool._dispatcher.slots[0], socket))
    impostor.send_multipart([bytes((99, protocol.Tag.RESULTS)), protocol._pack([])])
    impostor.send_multipart(protocol.encode(protocol.Tag.RESULTS, [[10**9, ["forged"], ["stop"], 1, 1,
                                                               None, None, None]]))
    assert no_answer(impostor, 0.5)
    futures = [pool.submit(f"p{i}") for i in range(50)]
    assert [f.result(timeout=10).text for f in futures] == [f"p{i}" for i in range(50)]
    after = pool.stats()["workers"][0]
    assert after["pid"] == worker["pid"] and after["restarts"] == worker["restarts"]


@pytest.mark.timeout(30)
def test_late_results_from_a_dead_incarnation_are_dropped(no_child_left):
    # A result that arrives from a worker's previous life must not resolve the request a second time.
    with mpdp.Pool(engine="echo", num_workers=1, engine_options={"delay_s": 60}, **FAST) as pool:
        held = pool.submit("held")
        worker = lambda: pool.stats()["workers"][0]
        wait_until(lambda: worker()["in_flight"] == 1, 5, what="the request in flight")
        old = pool._dispatcher.slots[0].identity
        os.kill(worker()["pid"], 9)
        wait_until(lambda: worker()["restarts"] == 1 and worker()["state"] == "ready"
                   and worker()["in_flight"] == 1, 30, what="the restart, holding the request again")
        ctx = zmq.Context()
        try:
            ghost = connect_dealer(ctx, pool._dispatcher.transport.endpoint, old, None)
            before = dropped(pool)
            ghost.send_multipart(protocol.encode(protocol.Tag.RESULTS, [[held.request_id, ["forged"], ["stop"],
                                                                     1, 1, None, None, None]]))
            wait_until(lambda: dropped(pool) == before + 1, 5, what="the ghost's frame to be dropped")
            assert not held.done()
        finally:
            ctx.destroy(linger=0)
        held.cancel()


def test_no_pickle_can_travel():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import pickle
    with pytest.raises(mpdp.ProtocolError):
        protocol.decode([bytes((protocol.VERSION, protocol.Tag.RESULTS)), pickle.dumps(Evil())])
    with pytest.raises(TypeError, match="not serialisable"):
        protocol.check_encodable(Evil(), "the request")


# ─── Transports ──────────────────────────────────────────────────────────────


def test_ipc_endpoint_lives_in_a_private_folder(pool):
    transport = pool._dispatcher.transport
    assert transport.endpoint.startswith("ipc://" + transport.folder)
    assert stat.S_IMODE(os.stat(transport.folder).st_mode) == 0o700
    assert os.stat(transport.folder).st_uid == os.getuid()


def test_tcp_binds_to_loopback_and_is_always_curve_authenticated():
    assert Transport("tcp").host == "127.0.0.1"
    assert Transport("tcp").curve is not None                          # keys made per pool
    keys = CurveKeys.generate()
    assert Transport("tcp", host="0.0.0.0", curve=keys).curve is keys   # or given
    assert Transport("ipc").curve is None
    with pytest.raises(ValueError, match="IPv4"):
        Transport("tcp", host="::1")
    with pytest.raises(ValueError, match="'ipc' or 'tcp'"):
        Transport("udp")


@pytest.mark.timeout(60)
def test_curve_pool_serves_its_workers_and_nobody_else(no_child_left):
    keys = CurveKeys.generate()
    with mpdp.Pool(engine="echo", num_workers=2, transport=Transport("tcp", curve=keys), **FAST) as pool:
        endpoint = pool._dispatcher.transport.endpoint
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert [c.text for c in pool.generate([f"p{i}" for i in range(100)])] == [f"p{i}" for i in range(100)]
        ctx = zmq.Context()
        try:
            stranger = CurveKeys.generate()
            wrong_key = connect_dealer(ctx, endpoint, b"w0.0x", CurveKeys(
                keys.server_public, b"", stranger.client_public, stranger.client_secret))
            plain = ctx.socket(zmq.DEALER)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(endpoint)
            right_key = connect_dealer(ctx, endpoint, b"stranger", keys)
            before = dropped(pool)
            for sock in (wrong_key, plain):    # refused in the handshake: nothing gets through
                sock.setsockopt(zmq.SNDTIMEO, 500)
                try:                           # a DEALER with no accepted peer blocks on send
                    sock.send_multipart(protocol.encode(protocol.Tag.SUBMIT, [[1, "hi", None, None, {}]]))
                except zmq.Again:
                    pass
                assert no_answer(sock, 0.5)
            assert dropped(pool) == before
            right_key.send_multipart(protocol.encode(protocol.Tag.HEARTBEAT, {}))
            wait_until(lambda: dropped(pool) == before + 1, 5, what="the unknown identity's frame")
            assert no_answer(right_key)
            assert pool.submit("still serving").result(timeout=10).text == "still serving"
        finally:
            ctx.destroy(linger=0)
