"""The KV-event listener: one thread owning one SUB socket that hears every engine's cache events.

Data flow::

    worker 0 engine ─ PUB (vLLM ZmqEventPublisher) ─┐                 ┌─ KVIndex (routing/kv_index.py)
    worker 1 engine ─ PUB ──────────────────────────┼─▶ SUB ─ listener ┤    holders, live   ◀── read by the
    ... (local: ipc; on Ray nodes: tcp)             │   thread         │                        dispatcher's
         ROUTER (replay) ◀─ DEALER, on a gap ───────┘                 └─ wanted, expected ──▶ policy (choose)

A vLLM worker turns on ``kv_events_config`` and announces its publisher in READY (``extra.kv_events``:
topic, endpoint, replay endpoint, block size). The policy writes that into the index's ``wanted``
map on the dispatcher thread; this thread, at its next round (every ``POLL_S`` at most), connects
to the new publisher, disconnects from the dead one and starts that worker's index empty (a fresh
engine holds nothing). Frames are vLLM's: ``[topic, seq (8 bytes, big-endian), payload]``, the
payload a msgpack ``KVEventBatch`` as msgspec encodes it: array-like structs in the releases that
declare ``array_like=True``, maps otherwise; both are read (``decode_batch``). A topic names the
worker index and a random tag per engine, so frames of a dead incarnation are dropped.

A sequence gap (a SUB socket joins a publisher late, and sees its first batch with seq > 0; or a
batch was lost) is repaired from the publisher's replay socket (vLLM keeps its last
``buffer_steps`` batches); when the replay cannot cover it, the worker's index is cleared and goes on
from the batch at hand, so it holds less than the engine, never more. When requests that stored
blocks finished on a worker while no batch of it was applied since they were sent
(``KVIndex.expected`` grew) and no batch arrives within ``stale_s`` after that, the worker's events
are taken as stopped: it is not ``live`` and the policy uses its mirror for it, until a batch
arrives again (in sequence, or repaired). The test is counted in batches, not in time since the
last one: the engine publishes a request's blocks when it schedules it, so a request that waited
long in the engine's queue or took long to prefill has had its batch long before it finishes, and
only a request after which no batch came at all raises the question.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import msgpack
import zmq

from mpdp.engines.kv_endpoints import remove_ipc_folder
from mpdp.routing.kv_index import APPLIED, CLEARED, GAP, REMOVED, STORED, KVIndex
from mpdp.wire.transport import connect_event_replay, connect_event_subscriber

log = logging.getLogger("mpdp")

POLL_S = 0.05                   # the longest the thread waits before it looks at ``wanted`` again
MAX_FRAMES_PER_ROUND = 1024
END_SEQ = -1                    # vLLM's end-of-replay marker (a signed 8-byte -1)


# -- vLLM's event batches ----------------------------------------------------------------------------
def decode_batch(payload: bytes) -> list[tuple]:
    """A ``KVEventBatch`` payload as ``kv_index`` event tuples. Events mpdp cannot key by tokens
    alone (LoRA, multimodal or salted blocks, other media than the GPU, other KV-cache groups) are
    left out; a stored block left out makes its children orphans, which the index drops.
    ValueError for anything that is not a batch."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable KV event batch: {exc}") from exc
    events = batch.get("events") if isinstance(batch, dict) else batch[1] if isinstance(batch, list) else None
    if not isinstance(events, list):
        raise ValueError("a KV event batch must be [ts, events, ...] or {ts, events, ...}")
    out = []
    for e in events:
        if isinstance(e, list) and e:
            kind, fields = e[0], e[1:]
            get = fields.__getitem__
            has = len(fields).__gt__
            named = False
        elif isinstance(e, dict):
            kind, named = e.get("type"), True
        else:
            raise ValueError(f"a KV event must be an array or a map, not {type(e).__name__}")
        if kind == "BlockStored":
            if named:
                hashes, parent, tokens, size = e["block_hashes"], e.get("parent_block_hash"), e["token_ids"], e["block_size"]
                lora, medium, lora_name = e.get("lora_id"), e.get("medium"), e.get("lora_name")
                extra, group = e.get("extra_keys"), e.get("group_idx")
            else:
                hashes, parent, tokens, size = get(0), get(1), get(2), get(3)
                lora = get(4) if has(4) else None
                medium = get(5) if has(5) else None
                lora_name = get(6) if has(6) else None
                extra = get(7) if has(7) else None
                group = get(8) if has(8) else None
            if not (isinstance(hashes, list) and isinstance(tokens, list) and isinstance(size, int) and size > 0):
                raise ValueError("a BlockStored needs block_hashes, token_ids and a block_size")
            if (lora is None and lora_name is None and medium in (None, "GPU") and group in (None, 0)
                    and (not extra or all(x is None for x in extra))):
                out.append((STORED, hashes, parent, tokens, size))
        elif kind == "BlockRemoved":
            if named:
                hashes, medium, group = e["block_hashes"], e.get("medium"), e.get("group_idx")
            else:
                hashes = get(0)
                medium = get(1) if has(1) else None
                group = get(2) if has(2) else None
            if not isinstance(hashes, list):
                raise ValueError("a BlockRemoved needs block_hashes")
            if medium in (None, "GPU") and group in (None, 0):
                out.append((REMOVED, hashes))
        elif kind == "AllBlocksCleared":
            out.append((CLEARED,))
        # other kinds (later vLLM releases may add some) say nothing about what a worker holds
    return out


@dataclass(slots=True)
class _Follow:
    feed: Feed
    last_batch: float = 0.0          # monotonic time of the last batch
    expected: int = 0                # KVIndex.expected's count when last looked at
    expect_since: float | None = None
    stale: bool = False


class KVEventListener:
    """The thread that keeps ``index`` from every followed engine's events (module doc)."""

    def __init__(self, index: KVIndex | None = None, *, stale_s: float = 5.0, replay_timeout_s: float = 2.0):
        self.index = index or KVIndex()
        self.stale_s = stale_s
        self.replay_timeout_s = replay_timeout_s
        self.undecodable = 0
        self.tokenize = None
        self._follows: dict[int, _Follow] = {}
        self._by_topic: dict[bytes, int] = {}
        self._closed = threading.Event()
        self._ctx = zmq.Context()
        self._sub = connect_event_subscriber(self._ctx)
        self._thread = threading.Thread(target=self._run, name="mpdp-kv-events", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._follow_wanted()
                if self._sub.poll(int(POLL_S * 1000)):
                    self._drain(time.monotonic())
                self._check_stale(time.monotonic())
        except Exception:                        # routing falls back to the mirrors; say why
            log.exception("mpdp: the KV event listener failed; cache-aware routing uses its mirrors")
        finally:
            for i in list(self._follows):
                self._unfollow(i)
            self._sub.close(linger=0)
            self._ctx.term()

    def _follow_wanted(self) -> None:
        wanted = dict(self.index.wanted)         # a copy: the dispatcher thread writes it
        for i, f in list(self._follows.items()):
            if wanted.get(i) != f.feed:
                self._unfollow(i)
        for i, feed in wanted.items():
            if i not in self._follows:
                self._follows[i] = _Follow(feed, last_batch=time.monotonic(),
                                           expected=self.index.expected.get(i, (0, 0))[0])
                self._by_topic[feed.topic.encode()] = i
                self.index.start(i, feed)
                self._sub.connect(feed.endpoint)

    def _unfollow(self, i: int) -> None:
        f = self._follows.pop(i)
        self._by_topic.pop(f.feed.topic.encode(), None)
        try:
            self._sub.disconnect(f.feed.endpoint)
        except zmq.ZMQError:
            pass
        self.index.stop(i)
        remove_ipc_folder(f.feed.endpoint)       # a dead local engine cannot remove its own

    def _drain(self, now: float) -> None:
        sub = self._sub
        for _ in range(MAX_FRAMES_PER_ROUND):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            i = self._by_topic.get(frames[0]) if len(frames) == 3 else None
            if i is None:                        # a dead incarnation, or not vLLM's shape
                continue
            self._on_batch(i, int.from_bytes(frames[1], "big", signed=True), frames[2], now)

    def _on_batch(self, i: int, seq: int, payload: bytes, now: float) -> None:
        index, f = self.index, self._follows[i]
        try:
            events = decode_batch(payload)
            if index.apply(i, seq, events) == GAP:
                self._resync(i, seq, events)
        except Exception as exc:  # noqa: BLE001  (a value of the wrong type inside a well-formed batch too)
            # Not knowing what it said (or having applied part of it), the worker cannot be
            # trusted as it stands: clear it. The listener goes on for every worker.
            self.undecodable += 1
            log.warning("mpdp: worker %d sent a bad KV event batch %d (%r); its index is cleared", i, seq, exc)
            index.restart(i, seq + 1)
            return
        f.last_batch, f.expect_since = now, None
        if f.stale:
            f.stale = False
            index.set_live(i, True)
            log.info("mpdp: worker %d's KV events resumed", i)

    def _resync(self, i: int, seq: int, events: list) -> None:
        """Missed batches before ``seq``: replay them, or clear the worker and go on from ``seq``."""
        index = self.index
        feed = index.feed_of(i)
        if feed is not None and feed.replay_endpoint:
            for s, payload in self._replay(feed.replay_endpoint, index.next_seq(i)):
                if s >= seq:
                    break
                try:
                    if index.apply(i, s, decode_batch(payload)) != APPLIED:
                        break
                except Exception:  # noqa: BLE001  (a bad replayed batch: the worker restarts below)
                    break
            if index.next_seq(i) == seq:
                index.apply(i, seq, events)
                index.note_resync(i)
                return
        log.info("mpdp: worker %d's KV events have a gap before batch %d that cannot be replayed; "
                 "its index restarts empty", i, seq)
        index.restart(i, seq)
        index.apply(i, seq, events)

    def _replay(self, endpoint: str, start: int) -> list[tuple[int, bytes]]:
        """The publisher's buffered batches from ``start`` on ([] if it does not answer in time)."""
        sock = connect_event_replay(self._ctx, endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            sock.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + self.replay_timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    return []
                frames = sock.recv_multipart()
                if len(frames) != 3:
                    return []
                s = int.from_bytes(frames[1], "big", signed=True)
                if s == END_SEQ:
                    return out
                out.append((s, frames[2]))
        finally:
            sock.close(linger=0)

    def _check_stale(self, now: float) -> None:
        index = self.index
        expected = index.expected
        for i, f in self._follows.items():
            n, seen = expected.get(i, (0, 0))
            if n != f.expected:
                f.expected = n
                # A batch applied since the dispatcher looked was the one it waits for.
                if f.expect_since is None and index.batches(i) == seen:
                    f.expect_since = now
            if f.expect_since is not None and not f.stale and now - f.expect_since > self.stale_s:
                f.stale = True
                self.index.set_live(i, False)
                log.warning("mpdp: worker %d stored KV blocks but published no event for %.1fs; "
                            "routing uses the mirror for it until its events resume", i, now - f.expect_since)


def attach(policy, engine_cls, model: str, options: dict, remote: bool) -> KVEventListener | None:
    """Give ``policy`` the engines' events where both sides want them (cache_aware on vLLM): turn
    on the engines' publishers (``options["kv_events"]``), load the model's tokenizer once for the
    callers' threads and start the listener. None where the pool keeps the mirror alone."""
    if not (getattr(policy, "wants_kv_events", False) and getattr(engine_cls, "publishes_kv_events", False)):
        return None
    if options.get("kv_events") is False or options.get("enable_prefix_caching") is False:
        options.pop("kv_events", None)
        return None
    from mpdp.core.prompt_tokens import PromptTokenizer

    try:
        tokenize = PromptTokenizer(model, options)
    except Exception as exc:  # noqa: BLE001  (routing still works, by the mirror)
        log.warning("mpdp: cache-aware routing keeps its mirror: the model's tokenizer did not load (%s)", exc)
        return None
    options["kv_events"] = "tcp" if remote else "ipc"
    listener = KVEventListener()
    listener.tokenize = tokenize               # kept for a policy that replaces this one (bench/prefix.py)
    policy.use_kv_events(listener.index, tokenize, int(options.get("block_size") or 16))
    return listener
