"""Exact prefix-cache routing from the engines' KV-cache events (issue 25), on CPU.

vLLM is not installed here: the event frames are built as vLLM's ``ZmqEventPublisher`` builds
them (topic, 8-byte big-endian sequence, msgpack payload of a ``KVEventBatch``), in both layouts
msgspec gives its structs (array-like and map).
"""

from __future__ import annotations

from types import SimpleNamespace

from mpdp.engines import vllm as vllm_engine
from mpdp.engines.base import EngineResult
from mpdp.wire import protocol


# -- what the engine reused, per request ---------------------------------------------------------
def _output(num_cached_tokens):
    choice = SimpleNamespace(index=0, text="hi", token_ids=[1, 2], finish_reason="length", logprobs=None)
    return SimpleNamespace(outputs=[choice], prompt_token_ids=list(range(40)), num_cached_tokens=num_cached_tokens)


def _no_records(choice):
    raise AssertionError("no choice asked for logprobs")


def test_vllm_num_cached_tokens_reaches_the_result_and_crosses_the_wire():
    res = vllm_engine._result(7, _output(32), _no_records)
    assert res.cached_tokens == 32 and res.prompt_tokens == 40
    _, body = protocol.decode(protocol.encode(protocol.Tag.RESULTS, [protocol.result_to_wire(res)]))
    assert protocol.result_from_wire(body[0]).cached_tokens == 32
    acc = vllm_engine._Accumulated(40, _no_records)
    acc.add(_output(16))
    acc.add(_output(None))                 # a later delta that does not repeat it keeps the figure
    assert acc.final(7, _output(None)).cached_tokens == 16
    assert EngineResult(1).cached_tokens is None   # engines that do not say (hf, echo)
    bad = protocol.result_to_wire(res)
    bad[10] = "32"                         # a worker's bug must not reach the dispatcher's sums
    with pytest.raises(protocol.ProtocolError):
        protocol.result_from_wire(bad)


# -- vLLM-shaped event batches -------------------------------------------------------------------
import os
import threading
import time
from collections import deque

import msgpack
import pytest
import zmq

from mpdp.core.kv_events import KVEventListener, decode_batch
from mpdp.routing import CacheAware, Ticket, WorkerLoad
from mpdp.routing.kv_index import (APPLIED, CLEARED, DUPLICATE, GAP, REMOVED, STORED, Feed, KVIndex, block_keys,
                                   cacheable_blocks, feed_from_ready)

BS = 4   # block size of the tests' engines


def stored(hashes, parent, tokens, array_like=True, medium="GPU", lora_id=None):
    """A vLLM BlockStored as msgspec encodes it (tag first / "type" field; trailing defaults omitted)."""
    if array_like:
        return ["BlockStored", hashes, parent, tokens, BS, lora_id, medium, None]
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": lora_id, "medium": medium, "lora_name": None}


def removed(hashes, array_like=True):
    return ["BlockRemoved", hashes, "GPU"] if array_like else {"type": "BlockRemoved", "block_hashes": hashes,
                                                               "medium": "GPU"}


def cleared(array_like=True):
    return ["AllBlocksCleared"] if array_like else {"type": "AllBlocksCleared"}


def batch(events, array_like=True) -> bytes:
    body = [time.time(), events, 0] if array_like else {"ts": time.time(), "events": events, "data_parallel_rank": 0}
    return msgpack.packb(body, use_bin_type=True)


def chain(tokens, parent=None, first=1):
    """Engine hashes for the whole blocks of ``tokens`` (any distinct values do: mpdp never recomputes them)."""
    n = len(tokens) // BS
    return [first + i for i in range(n)], parent, tokens[:n * BS]


def feed(topic="mpdp-kv/0/aa", endpoint="inproc://x", replay=None, limit=1000) -> Feed:
    return Feed(topic, endpoint, replay, BS, limit)


# -- the pure index --------------------------------------------------------------------------------
def test_stored_removed_cleared_and_copies():
    kv = KVIndex()
    kv.start(0, feed())
    toks = list(range(100, 112))                       # 3 blocks
    hashes, parent, t = chain(toks)
    assert kv.apply(0, 0, decode_batch(batch([stored(hashes, parent, t)]))) == APPLIED
    keys = block_keys(toks, BS)
    assert kv.match(keys, [0]) == {0: 3}
    assert kv.match(block_keys(toks[:4] + [0, 0, 0, 0], BS), [0]) == {0: 1}   # diverges at block 2
    # a second copy of the tail block (two requests filled it at once): evicting one keeps it
    assert kv.apply(0, 1, [(STORED, [3], 2, toks[8:12], BS)]) == APPLIED
    assert kv.apply(0, 2, [(REMOVED, [3])]) == APPLIED
    assert kv.match(keys, [0]) == {0: 3}
    assert kv.apply(0, 3, [(REMOVED, [3, 99])]) == APPLIED   # an unknown hash is ignored
    assert kv.match(keys, [0]) == {0: 2}
    assert kv.apply(0, 4, [(CLEARED,)]) == APPLIED
    assert kv.match(keys, [0]) == {0: 0} and kv.holders == {}


def test_a_block_under_an_unknown_parent_is_dropped_never_guessed():
    kv = KVIndex()
    kv.start(0, feed())
    kv.apply(0, 0, [(STORED, [7, 8], 555, list(range(8)), BS)])
    assert kv.blocks(0) == 0 and kv.worker_stats(0)["kv_orphans"] == 2


def test_sequence_gap_duplicate_restart_and_bounded_memory():
    kv = KVIndex()
    kv.start(0, feed(limit=4))
    toks = list(range(8))
    assert kv.apply(0, 0, [(STORED, [1, 2], None, toks, BS)]) == APPLIED
    assert kv.apply(0, 0, [(STORED, [1, 2], None, toks, BS)]) == DUPLICATE
    assert kv.apply(0, 5, [(REMOVED, [1])]) == GAP and kv.blocks(0) == 2    # nothing applied
    kv.restart(0, 5)                                                        # no replay: clear, go on
    assert kv.blocks(0) == 0 and kv.next_seq(0) == 5
    assert kv.apply(0, 5, [(STORED, [1, 2], None, toks, BS)]) == APPLIED
    many = list(range(40))                                                  # 10 blocks > limit 4
    kv.apply(0, 6, [(STORED, list(range(100, 110)), None, many, BS)])
    assert kv.blocks(0) == 0 and kv.worker_stats(0)["kv_overflows"] == 1 and kv.holders == {}


def test_two_workers_and_a_restart_clear_only_that_worker():
    kv = KVIndex()
    toks = list(range(12))
    for i in (0, 1):
        kv.start(i, feed(topic=f"t{i}"))
        kv.apply(i, 0, [(STORED, [1, 2, 3], None, toks, BS)])
    keys = block_keys(toks, BS)
    assert kv.match(keys, [0, 1]) == {0: 3, 1: 3}
    kv.start(1, feed(topic="t1-new"))                  # a new incarnation starts empty
    assert kv.match(keys, [0, 1]) == {0: 3, 1: 0}
    kv.stop(0)
    assert kv.holders == {}


def test_keys_stop_before_the_last_token_as_vllm_does():
    assert cacheable_blocks(12, 4) == 2 and cacheable_blocks(13, 4) == 3 and cacheable_blocks(0, 4) == 0
    assert len(block_keys(list(range(12)), 4, cacheable_blocks(12, 4))) == 2


def test_decode_both_msgspec_layouts_and_skip_what_tokens_cannot_key():
    for array_like in (True, False):
        events = decode_batch(batch([stored([1], None, [1, 2, 3, 4], array_like),
                                     stored([2], None, [5, 6, 7, 8], array_like, medium="CPU"),
                                     stored([3], None, [5, 6, 7, 8], array_like, lora_id=2),
                                     removed([1], array_like), cleared(array_like)], array_like))
        assert events == [(STORED, [1], None, [1, 2, 3, 4], BS), (REMOVED, [1]), (CLEARED,)]
    bytes_hash = b"\x01" * 32                          # sha256 block hashes travel as msgpack bin
    assert decode_batch(batch([stored([bytes_hash], None, [1, 2, 3, 4])]))[0][1] == [bytes_hash]
    with pytest.raises(ValueError):
        decode_batch(b"\xc1")


def test_feed_from_ready():
    info = {"kv_cache_tokens": 4000, "extra": {"kv_events": {"topic": "t", "endpoint": "ipc://e",
                                                             "replay_endpoint": "ipc://r", "block_size": 16}}}
    f = feed_from_ready(info)
    assert (f.topic, f.endpoint, f.replay_endpoint, f.block_size, f.limit) == ("t", "ipc://e", "ipc://r", 16, 1524)
    assert feed_from_ready({"extra": {}}) is None and feed_from_ready({}) is None


# -- the listener, against a publisher shaped as vLLM's ZmqEventPublisher ---------------------------
class Publisher:
    """vLLM's publisher in miniature: a PUB socket sending [topic, seq (8 bytes big-endian), payload],
    a ROUTER answering replay requests ([identity, b"", start seq]) with every buffered batch from
    there on, then the end marker (seq -1, empty payload). One thread owns both sockets."""

    def __init__(self, folder, topic: str, replay: bool = True):
        self.topic = topic.encode()
        self.endpoint = f"ipc://{folder}/ev-{topic.replace('/', '_')}"
        self.replay_endpoint = f"ipc://{folder}/rp-{topic.replace('/', '_')}" if replay else None
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self._todo: deque = deque()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(10)

    def publish(self, events, send: bool = True) -> int:
        """Queue one batch; ``send=False`` loses it on the way (it stays in the replay buffer)."""
        seq, self.seq = self.seq, self.seq + 1
        self._todo.append((seq, batch(events), send))
        return seq

    def feed(self, limit: int = 10_000) -> Feed:
        return Feed(self.topic.decode(), self.endpoint, self.replay_endpoint, BS, limit)

    def close(self):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.bind(self.endpoint)
        router = None
        if self.replay_endpoint:
            router = ctx.socket(zmq.ROUTER)
            router.bind(self.replay_endpoint)
        self._bound.set()
        try:
            while not self._stop.is_set():
                while self._todo:
                    seq, payload, send = self._todo.popleft()
                    self.buffer.append((seq, payload))
                    if send:
                        pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
                if router is not None and router.poll(10):
                    ident, _, start = router.recv_multipart()
                    for s, p in self.buffer:
                        if s >= int.from_bytes(start, "big"):
                            router.send_multipart([ident, b"", s.to_bytes(8, "big"), p])
                    router.send_multipart([ident, b"", (-1).to_bytes(8, "big", signed=True), b""])
                else:
                    time.sleep(0.01)
        finally:
            pub.close(0)
            if router is not None:
                router.close(0)
            ctx.term()


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def listener():
    made = []

    def make(**kwargs):
        lst = KVEventListener(**kwargs)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


@pytest.fixture
def publishers(tmp_path):
    made = []

    def make(topic, **kwargs):
        p = Publisher(tmp_path, topic, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def connected(lst: KVEventListener, pub: Publisher, i: int) -> None:
    """Publish probe batches until the SUB socket hears them (ZeroMQ's slow joiner): the first
    ones are lost and come back by replay."""
    lst.index.want(i, pub.feed())
    assert wait_for(lambda: lst.index.feed_of(i) == pub.feed())
    for _ in range(500):
        pub.publish([])
        if wait_for(lambda: lst.index.next_seq(i) == pub.seq, 0.2):
            return
    raise AssertionError("the listener never heard the publisher")


@pytest.mark.timeout(60)
def test_listener_keeps_the_index_and_replays_what_it_missed(listener, publishers):
    lst = listener()
    pub = publishers("mpdp-kv/0/aa")
    connected(lst, pub, 0)                             # probes it missed at first were replayed
    toks = list(range(40, 52))
    hashes, parent, t = chain(toks)
    pub.publish([stored(hashes, parent, t)], send=False)   # lost on the way
    pub.publish([removed([3])])                             # seen: a gap before it -> replay
    keys = block_keys(toks, BS)
    assert wait_for(lambda: lst.index.match(keys, [0]) == {0: 2})
    stats = lst.index.worker_stats(0)
    assert stats["kv_resyncs"] >= 1 and stats["kv_restarts"] == 0 and stats["kv_events_live"] is True


@pytest.mark.timeout(60)
def test_a_gap_that_cannot_be_replayed_clears_the_worker(listener, publishers):
    lst = listener()
    pub = publishers("mpdp-kv/0/bb", replay=False)
    lst.index.want(0, pub.feed())
    toks = list(range(12))
    for _ in range(500):                               # until one stored batch is heard
        pub.publish([stored(*chain(toks))])
        if wait_for(lambda: lst.index.blocks(0) == 3, 0.2):
            break
    keys = block_keys(toks, BS)
    assert lst.index.match(keys, [0]) == {0: 3}
    before = lst.index.worker_stats(0)["kv_restarts"]   # the slow joiner's first gap was one
    pub.publish([removed([1, 2, 3])], send=False)      # lost, and no replay socket
    pub.publish([])
    assert wait_for(lambda: lst.index.worker_stats(0)["kv_restarts"] == before + 1)
    assert lst.index.match(keys, [0]) == {0: 0}        # it may hold less than the engine, never more


@pytest.mark.timeout(60)
def test_a_batch_with_values_of_the_wrong_type_clears_that_worker_and_the_listener_goes_on(listener, publishers):
    lst = listener()
    pub = publishers("mpdp-kv/0/dd")
    connected(lst, pub, 0)
    toks = list(range(12))
    pub.publish([stored(*chain(toks))])
    keys = block_keys(toks, BS)
    assert wait_for(lambda: lst.index.match(keys, [0]) == {0: 3})
    # Well-formed as a batch, but a hash that is a list: unusable as a key.
    pub.publish([stored([[1], [2]], None, list(range(100, 108)))])
    assert wait_for(lambda: lst.undecodable == 1)
    assert lst.index.match(keys, [0]) == {0: 0}        # cleared: less than the engine, never more
    toks2 = list(range(200, 208))
    pub.publish([stored(*chain(toks2, first=50))])     # the listener still hears the worker
    assert wait_for(lambda: lst.index.match(block_keys(toks2, BS), [0]) == {0: 2})


@pytest.mark.timeout(60)
def test_a_restarted_worker_is_followed_on_its_new_topic_only(listener, publishers):
    lst = listener()
    old, new = publishers("mpdp-kv/0/old"), publishers("mpdp-kv/0/new")
    connected(lst, old, 0)
    connected(lst, new, 0)                             # READY of the new incarnation
    assert lst.index.usable(0) and lst.index.feed_of(0).topic == "mpdp-kv/0/new"
    toks = list(range(8))
    old.publish([stored(*chain(toks))])                # the old engine's last words are ignored
    new.publish([])
    assert wait_for(lambda: lst.index.next_seq(0) == new.seq)
    assert lst.index.blocks(0) == 0


@pytest.mark.timeout(60)
def test_events_that_stop_make_the_worker_fall_back_then_resume(listener, publishers):
    lst = listener(stale_s=0.3)
    pub = publishers("mpdp-kv/0/cc")
    connected(lst, pub, 0)
    time.sleep(0.5)
    lst.index.expect(0)                                # a request stored blocks; no batch follows
    assert wait_for(lambda: not lst.index.usable(0))
    pub.publish([])
    assert wait_for(lambda: lst.index.usable(0))


@pytest.mark.timeout(60)
def test_an_expectation_met_by_a_batch_already_applied_keeps_the_worker_live(listener, publishers):
    # A request sent before the last batch (a long prefill, published when it was scheduled) that
    # finishes only now is no sign that the events stopped, however long ago that batch was.
    lst = listener(stale_s=0.3)
    pub = publishers("mpdp-kv/0/dd")
    connected(lst, pub, 0)
    lst.index.expect(0, lst.index.batches(0) - 1)
    assert wait_for(lambda: lst._follows[0].expected == 1)    # the listener has looked at it
    time.sleep(1.0)
    assert lst.index.usable(0)


# -- routing by the index ----------------------------------------------------------------------------
from mpdp.engines.base import EngineRequest  # noqa: E402


def _policy_with_index(pending=True):
    policy = CacheAware(block_tokens=8, events=True, pending=pending)
    kv = KVIndex()
    policy.use_kv_events(kv, lambda req: req.prompt_token_ids, BS)
    workers = [WorkerLoad(i, capacity=100) for i in range(2)]
    for w in workers:
        info = {"kv_cache_tokens": 4000, "extra": {"kv_events": {"topic": f"t{w.index}", "endpoint": "ipc://e",
                                                                 "replay_endpoint": None, "block_size": BS}}}
        policy.worker_added(w.index, info)
        kv.start(w.index, kv.wanted[w.index])          # what the listener does when it follows it
    return policy, kv, workers


def _ticket(policy, i, ids, max_tokens=8):
    req = EngineRequest(i, None, None, ids, {"max_tokens": max_tokens})
    return Ticket(i, 999, policy.route_key(req))


def test_choose_follows_the_exact_index_and_falls_back_to_the_mirror():
    policy, kv, (w0, w1) = _policy_with_index()
    doc = list(range(1000, 1040))                      # 10 blocks of 4
    kv.apply(1, 0, [(STORED, list(range(1, 11)), None, doc, BS)])   # worker 1's engine holds it
    w0.in_flight[99] = Ticket(99, 5)                   # both busy, worker 1 more so
    w0.outstanding, w1.outstanding = 5, 20
    w1.in_flight[98] = Ticket(98, 20)
    t = _ticket(policy, 1, doc + [7, 7])
    assert t.route.cost == 1 + 42 + 8                  # exact prompt length, not the 4-character guess
    assert policy.choose(t, [w0, w1]) is w1
    assert t.route.predicted == 40 and t.route.predicted_exact and t.cost == 51 - 40
    # worker 1's events stop, its engine drops the prefix: its mirror still says it holds it
    kv.set_live(1, False)
    placed = _placed(policy, doc, 2)
    policy.assigned(placed, 1)
    policy.finished(placed, 1)                         # over before the engine cleared its cache
    kv.apply(1, 1, [(CLEARED,)])
    t3 = _ticket(policy, 3, doc + [8, 8])
    assert policy.choose(t3, [w0, w1]) is w1 and not t3.route.predicted_exact and t3.route.predicted == 40
    kv.set_live(1, True)                               # resumed: the exact index (empty now) predicts
    t4 = _ticket(policy, 4, doc + [9, 9])
    # sticky (the default): worker 1 is still the prefix's home, at the charge of a miss
    assert policy.choose(t4, [w0, w1]) is w1 and t4.route.predicted_exact and t4.route.predicted == 0
    assert t4.cost == t4.route.cost
    policy.sticky = False                              # the exact index alone: by load
    t5 = _ticket(policy, 5, doc + [9, 9])
    assert policy.choose(t5, [w0, w1]) is w0 and t5.route.predicted_exact and t5.route.predicted == 0


def test_a_request_up_to_the_context_is_routed_by_the_index():
    # max_tokens="context" (the server's chat default) once raised TypeError in route_key, in the
    # caller's thread: every such request failed on a pool routing by the engines' events.
    policy, kv, (w0, w1) = _policy_with_index()
    doc = list(range(1000, 1040))
    kv.apply(1, 0, [(STORED, list(range(1, 11)), None, doc, BS)])
    req = EngineRequest(1, None, None, doc + [7, 7], {"max_tokens": "context"})
    t = Ticket(1, 555, policy.route_key(req))          # 555: the pool's estimate (a guess of the output)
    assert t.route.exact and t.route.prompt_tokens == 42
    assert policy.choose(t, [w0, w1]) is w1 and t.route.predicted == 40 and t.cost == 555 - 40


def _placed(policy, ids, i):
    t = _ticket(policy, i, ids)
    t.route.cost = t.cost
    return t


def test_reported_counts_predictions_and_expects_events_for_new_blocks():
    policy, kv, (w0, w1) = _policy_with_index()
    t = _ticket(policy, 1, list(range(20)))
    w = policy.choose(t, [w0, w1])
    policy.assigned(t, w.index)
    assert t.route.predicted == 0
    policy.reported(t, w.index, 20, 0)                 # nothing cached: it stored 5 blocks
    policy.reported(t, w.index, 20, 2)                 # off by less than one block
    policy.reported(t, w.index, 20, 16)                # 16 cached, 20 // 4 = 5 blocks > 4: still new ones
    stats = policy.worker_stats(w.index)
    assert stats["predicted_exact"] == 3 and stats["predicted_exact_within_block"] == 2
    assert kv.expected[w.index] == (3, 0)              # three requests, no batch seen since they were sent
    policy.reported(t, w.index, 19, 16)                # every whole block was cached: no event due
    assert kv.expected[w.index] == (3, 0)


def test_a_long_prefill_whose_batch_came_raises_no_expectation():
    # The engine publishes a request's blocks when it schedules it: however long it then takes,
    # a batch applied since it was sent is its proof of life, and nothing is expected.
    policy, kv, (w0, w1) = _policy_with_index()
    ids = list(range(500, 540))
    t = _ticket(policy, 1, ids)
    w = policy.choose(t, [w0, w1])
    policy.assigned(t, w.index)
    kv.apply(w.index, 0, [(STORED, list(range(1, 11)), None, ids, BS)])
    policy.reported(t, w.index, 40, 0)
    assert w.index not in kv.expected


# -- the pending layer: prefixes sent, not yet confirmed by the engine's events ------------------------
from mpdp.routing.kv_pending import PendingBlocks  # noqa: E402


def _busy(w0, w1, load0, load1):
    """Both workers hold a request (so the wide allowance applies), with these queued tokens."""
    w0.in_flight[900], w1.in_flight[901] = Ticket(900, load0), Ticket(901, load1)
    w0.outstanding, w1.outstanding = load0, load1


def _send(policy, workers, i, ids):
    t = _ticket(policy, i, ids)
    w = policy.choose(t, workers)
    w.in_flight[t.id] = t
    w.outstanding += t.cost
    policy.assigned(t, w.index)
    return t, w


def test_a_follower_of_an_unconfirmed_prefix_goes_to_the_same_worker():
    doc = list(range(2000, 2064))                      # 16 blocks of 4
    for pending, sticky in ((True, True), (True, False), (False, False), (False, True)):
        policy, kv, (w0, w1) = _policy_with_index(pending=pending)
        policy.sticky = sticky
        _busy(w0, w1, 10, 20)
        first, w = _send(policy, [w0, w1], 1, doc + [1, 1])
        assert w is w0 and first.route.predicted == 0  # cached nowhere: the least loaded
        assert kv.holders == {}                        # its engine has not scheduled it yet
        w0.outstanding += 100                          # now worker 0 is the busier one
        follower, w = _send(policy, [w0, w1], 2, doc + [2, 2])
        if pending:
            assert w is w0 and follower.route.predicted == 64 and follower.route.predicted_exact
            assert follower.cost == follower.route.cost - 64      # charged only its uncached part
        elif not sticky:                               # the first version: by load, a second copy
            assert w is w1 and follower.route.predicted == 0
        else:                                          # the mirror keeps it home, charged in full
            assert w is w0 and follower.route.predicted == 0 and follower.cost == follower.route.cost


def test_pending_claims_give_way_to_confirmed_blocks_and_their_removal():
    policy, kv, (w0, w1) = _policy_with_index()
    pend = policy._pending
    doc = list(range(3000, 3064))
    _busy(w0, w1, 10, 20)
    first, _ = _send(policy, [w0, w1], 1, doc + [1, 1])
    assert pend.keys(0) == 16                          # 16 blocks claimed
    policy.finished(first, 0)                          # over; its batch may still be on its way
    assert pend.draining(0) == 1 and pend.keys(0) == 16
    kv.apply(0, 0, [(STORED, list(range(1, 17)), None, doc, BS)])    # the engine's event: confirmed
    w0.outstanding += 100
    follower, w = _send(policy, [w0, w1], 2, doc + [2, 2])
    assert w is w0 and follower.route.predicted == 64
    assert pend.draining(0) == 0                       # given back at the first batch after it ended
    policy.finished(follower, 0)
    kv.apply(0, 1, [(REMOVED, list(range(9, 17)))])    # the engine evicted the tail: the index says so
    pend.drain(0, kv.batches(0))
    assert pend.keys(0) == 0 and pend.holders == {}
    third, w = _send(policy, [w0, w1], 3, doc + [3, 3])
    assert w is w0 and third.route.predicted == 32     # what is left, not what was sent
    kv.apply(0, 2, [(CLEARED,)])
    fourth, w = _send(policy, [w0, w1], 4, doc + [4, 4])
    # the third request is still in flight on worker 0: it stores its whole prefix there again
    assert w is w0 and fourth.route.predicted == 64
    policy.finished(third, 0)
    policy.finished(fourth, 0)
    kv.apply(0, 3, [])                                 # a later batch: the claims go
    fifth, w = _send(policy, [w0, w1], 5, doc + [5, 5])
    assert w is w0 and fifth.route.predicted == 0      # cached nowhere: sticky, it goes home all the same
    policy.finished(fifth, 0)
    kv.apply(0, 4, [])                                 # (it stored nothing: the engine had evicted it again)
    policy.sticky = False
    sixth, w = _send(policy, [w0, w1], 6, doc + [6, 6])
    assert w is w1 and sixth.route.predicted == 0      # not sticky: by load


def _evicted_from_home(sticky):
    """A prefix sent to worker 0 (its home), stored there, then evicted by its engine; both workers
    busy, worker 0 the busier by a little: where does its next request go, at what charge?"""
    policy, kv, (w0, w1) = _policy_with_index()
    policy.sticky = sticky
    doc = list(range(6000, 6064))                      # 16 blocks of 4 (and 8 mirror blocks of 8)
    _busy(w0, w1, 10, 20)
    first, w = _send(policy, [w0, w1], 1, doc + [1, 1])
    assert w is w0
    kv.apply(0, 0, [(STORED, list(range(1, 17)), None, doc, BS)])    # the engine stored it
    del w0.in_flight[first.id]
    w0.outstanding -= first.cost
    policy.finished(first, 0)
    kv.apply(0, 1, [(REMOVED, list(range(1, 17)))])    # then evicted all of it
    pend = policy._pending
    pend.drain(0, kv.batches(0))
    assert kv.holders == {} and pend.holders == {}     # cached nowhere, pending nowhere
    assert policy.matches(first.route, [w0, w1]) == {0: 8, 1: 0}     # the mirror still says home
    w0.outstanding += 40                               # worker 0 now 50 tokens behind worker 1
    t = _ticket(policy, 2, doc + [2, 2])
    return policy.choose(t, [w0, w1]), t, (w0, w1)


def test_sticky_sends_an_evicted_prefix_home_at_its_exact_charge():
    w, t, (w0, w1) = _evicted_from_home(sticky=True)
    # home, within the load window its affinity (the mirror's 64 tokens) buys: 16 x 64 >> 50
    assert w is w0
    # charged its whole cost and predicted a miss: the engine has none of it
    assert t.cost == t.route.cost == 1 + 66 + 8
    assert t.route.predicted == 0 and t.route.predicted_exact
    assert CacheAware(events=True).sticky and make_policy_options({"events": True, "sticky": False}).sticky is False


def test_without_sticky_an_evicted_prefix_goes_by_load():
    w, t, (w0, w1) = _evicted_from_home(sticky=False)
    assert w is w1                                     # the exact index says nowhere: least loaded
    assert t.cost == t.route.cost == 1 + 66 + 8
    assert t.route.predicted == 0 and t.route.predicted_exact


def test_sticky_affinity_gives_way_to_load_beyond_its_window():
    policy, kv, (w0, w1) = _policy_with_index()
    doc = list(range(7000, 7064))
    _busy(w0, w1, 10, 20)
    first, _ = _send(policy, [w0, w1], 1, doc + [1])
    policy.finished(first, 0)
    kv.apply(0, 0, [])                                 # a batch: the claim goes; nothing was stored
    policy._pending.drain(0, kv.batches(0))
    w0.outstanding += 10_000                           # far beyond 16 x 64 tokens of affinity
    t = _ticket(policy, 2, doc + [2])
    assert policy.choose(t, [w0, w1]) is w1 and t.route.predicted == 0


def test_sticky_never_prefers_a_remembered_home_to_a_confirmed_copy():
    # The mirror's blocks (8 tokens here) cover more of a 72-token prompt than the engine's
    # cacheable blocks (17 x 4 = 68, the last token never cached): the old home's memory must not
    # outrank the worker whose engine really holds the prefix.
    policy, kv, (w0, w1) = _policy_with_index()
    doc = list(range(8000, 8072))
    _busy(w0, w1, 10, 20)
    first, w = _send(policy, [w0, w1], 1, doc)
    assert w is w0
    del w0.in_flight[first.id]
    w0.outstanding -= first.cost
    policy.finished(first, 0)
    kv.apply(0, 0, [])                                 # worker 0 stored nothing of it (evicted since)
    policy._pending.drain(0, kv.batches(0))
    kv.apply(1, 0, [(STORED, list(range(1, 18)), None, doc[:68], BS)])   # worker 1's engine holds it
    t = _ticket(policy, 2, doc)
    assert policy.choose(t, [w0, w1]) is w1 and t.route.predicted == 68 and t.cost == t.route.cost - 68


def make_policy_options(options):
    from mpdp.routing import make_policy

    return make_policy("cache_aware", options)


def test_pending_claims_follow_retries_and_die_with_their_worker():
    policy, kv, (w0, w1) = _policy_with_index()
    pend = policy._pending
    doc = list(range(4000, 4064))
    t, w = _send(policy, [w0, w1], 1, doc + [0])
    assert pend.keys(w.index) == 16
    policy.assigned(t, 1 - w.index)                    # re-bound elsewhere: the claim moves
    assert pend.keys(w.index) == 0 and pend.keys(1 - w.index) == 16
    policy.worker_removed(1 - w.index)                 # its engine is gone, and what was sent to it
    assert pend.holders == {}
    policy.finished(t, 1 - w.index)                    # a late finish of a dead claim changes nothing
    assert pend.holders == {}


def test_a_policy_swapped_onto_a_running_index_takes_pending_claims():
    # bench/prefix.py swaps policies on a running pool: the new one is told of the workers first,
    # then given the index, which already follows their engines.
    _, kv, (w0, w1) = _policy_with_index()
    policy = CacheAware(block_tokens=8, events=True)
    for w in (w0, w1):
        policy.worker_added(w.index, {"kv_cache_tokens": 4000})
    policy.use_kv_events(kv, lambda req: req.prompt_token_ids, BS)
    doc = list(range(5000, 5064))
    _busy(w0, w1, 10, 20)
    _send(policy, [w0, w1], 1, doc + [1])
    w0.outstanding += 100
    follower, w = _send(policy, [w0, w1], 2, doc + [2])
    assert w is w0 and follower.route.predicted == 64


def test_pending_memory_is_bounded():
    pb = PendingBlocks(stride=2, max_draining=3)
    pb.add_worker(0)
    marks = [pb.marks(tuple(range(k, k + 8))) for k in range(0, 800, 8)]   # 100 prompts of 8 blocks
    claims = [pb.claim(0, m) for m in marks]
    assert pb.keys(0) == 400 and all(len(m) == 4 for m in marks)
    for c, m in zip(claims, marks):
        pb.finish(c, m, batches=0)                     # over, and no batch ever comes
    assert pb.draining(0) == 3 and pb.keys(0) == 12    # only the last few wait
    pb.drain(0, batches=1)
    assert pb.keys(0) == 0 and pb.holders == {}
    # counted claims: two requests on one prefix, one gives it back
    a, b = pb.claim(0, marks[0]), pb.claim(0, marks[0])
    pb.release(a, marks[0])
    assert pb.match(marks[0], [0]) == {0: 8}           # 4 marks x stride 2
    pb.release(b, marks[0])
    assert pb.match(marks[0], [0]) == {0: 0}
    pb.add_worker(0)                                   # a new incarnation: an old claim is ignored
    pb.release(a, marks[0])
    assert pb.keys(0) == 0


def test_without_events_the_mirror_alone_routes():
    assert CacheAware().wants_kv_events is False        # the default until a GPU run says otherwise
    assert CacheAware(events=True).wants_kv_events is True
    policy = CacheAware(events=False)
    assert policy.wants_kv_events is False and policy.kv is None
    req = EngineRequest(1, "x" * 2000, None, None, {"max_tokens": 8})
    key = policy.route_key(req)
    assert key.exact == () and key.prompt_tokens is None


def test_metrics_carry_prefix_reuse_and_predictions():
    from prometheus_client import CollectorRegistry, generate_latest

    from mpdp.server.metrics import PoolCollector

    stats = {"workers": [
        {"index": 0, "state": "ready", "prompt_tokens": 1000, "cached_tokens": 750, "prefix_hit_rate": 0.75,
         "predicted_exact": 10, "predicted_exact_within_block": 9, "predicted_mirror": 2,
         "predicted_mirror_within_block": 1},
        {"index": 1, "state": "ready", "prompt_tokens": 50, "cached_tokens": None}]}   # an engine that does not say
    registry = CollectorRegistry()
    registry.register(PoolCollector(SimpleNamespace(stats=lambda: stats)))
    text = generate_latest(registry).decode()
    assert 'mpdp:prefix_cache_hits_total{worker="0"} 750.0' in text
    assert 'mpdp:prefix_cache_queries_total{worker="0"} 1000.0' in text
    assert 'mpdp:prefix_cache_hit_rate{worker="0"} 0.75' in text
    assert 'mpdp:routing_prefix_predictions_within_block_total{source="exact",worker="0"} 9.0' in text
    assert 'worker="1"} 50' not in text.split("mpdp:prefix_cache_queries")[1]


# -- opt-in from the pool's settings -------------------------------------------------------------------
def test_events_are_opt_in_through_routing_options(no_child_left):
    import mpdp
    from mpdp.cli import build_parser
    from mpdp.config import PoolConfig
    from mpdp.routing import make_policy

    assert make_policy("cache_aware").wants_kv_events is False
    assert make_policy("cache_aware", {"events": True, "pending": False})._pending is None
    with pytest.raises(TypeError, match="routing_options: cache_aware does not take"):
        PoolConfig(routing_options={"evnts": True})
    with pytest.raises(ValueError, match="routing_options: "):
        PoolConfig(routing_options={"pending_stride": 0})
    args = build_parser().parse_args(["serve", "--routing-option", "events=true", "--routing-option", "band=2"])
    assert PoolConfig.from_cli_args(args).routing_options == {"events": True, "band": 2}
    # echo publishes no events: the pool routes by the mirror, with the policy built from the options
    with mpdp.Pool(engine="echo", num_workers=2, routing_options={"events": True}, max_tokens=4) as pool:
        assert pool._policy.wants_kv_events and pool._kv_events is None
        assert len(pool.generate(["x" * 3000 + str(i) for i in range(6)])) == 6


def test_a_pool_that_fails_to_start_leaves_no_listener_behind(monkeypatch, no_child_left):
    # The listener was closed by close() and at garbage collection only: a pool whose workers
    # failed to start raised with its thread still running (as long as anything held the error).
    import mpdp
    import mpdp.core.prompt_tokens as prompt_tokens
    from mpdp.engines.echo import EchoEngine

    monkeypatch.setattr(EchoEngine, "publishes_kv_events", True, raising=False)   # echo refuses kv_events:
    monkeypatch.setattr(prompt_tokens, "PromptTokenizer", lambda model, options: lambda request: None)
    with pytest.raises(mpdp.WorkerStartError) as info:                 # its worker fails to start
        mpdp.Pool(engine="echo", num_workers=1, routing_options={"events": True}, heartbeat_interval=0.1)
    assert "kv_events" in str(info.value)
    assert "mpdp-kv-events" not in [t.name for t in threading.enumerate()]
