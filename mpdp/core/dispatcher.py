"""The dispatcher thread: the only owner of the ROUTER socket and of the table of pending requests.

Data flow (one box per owner)::

    caller threads               dispatcher thread                            workers (launcher)
    ──────────────               ─────────────────                            ──────────────────
    pool.submit() ─┐             ┌──────────────────────────────────┐
    pool.stream() ─┼▶ commands ─▶│ pending {id: Entry(future, sink)}│ SUBMIT  ┌─▶ DEALER ─ engine 0
    cancel()      ─┘  + wake fd  │ Scheduler (pure): credits, route,│─ROUTER─┼─▶ DEALER ─ engine 1
                                 │   crash retries and suspects     │◀───────┴── RESULTS (HEARTBEAT: beat sockets)
    future.result() ◀─ set_result│ Supervisor: sentinels, restarts  │  (partial RESULTS → the sink)
                                 └──────────────────────────────────┘

Callers never touch a socket: they append a command to a deque and wake the dispatcher
through a pipe (one write per wake-up, not per request). The dispatcher waits on one poll
over the ROUTER, the wake pipe and every worker's death sentinel, so a dead worker is seen at
once, never by blocking on a data socket. Every future is resolved exactly once, here; the
futures' done-callbacks run on a separate thread (``futures.py``), so user code never stalls
this loop or makes a healthy worker look silent. Each round does a bounded amount of work,
so sockets, deaths and heartbeats are always served, however fast commands arrive.

What to do with the requests of a dead worker is the scheduler's decision
(``Scheduler.worker_died``: retry in parallel, split suspects, fail a proven poison); this
thread only carries it out. A streamed request that already delivered text is not started
again: it continues from what it delivered (``resume.py``), or ends with StreamInterrupted.

A sink (where a stream's partial results go) is user-facing code run on this thread: the final
piece is handed to it before the future resolves, so an iterator that sees the future done has
every piece; and a sink that raises (an event loop closed under its stream) ends its own request
only, never this loop.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import zmq

from mpdp import errors
from mpdp.core.admission import Admission, PoolState
from mpdp.core.batch_limits import BatchLimits
from mpdp.core.resume import Delivered, why_not
from mpdp.core.supervisor import Slot, SlotState, Supervisor, describe
from mpdp.engines.base import Engine, EngineRequest, EngineResult
from mpdp.gcpause import gc_paused
from mpdp.requests import new_completion
from mpdp.routing import Scheduler, Ticket
from mpdp.wire import protocol
from mpdp.wire.protocol import Tag
from mpdp.wire.transport import Transport, start_curve_authenticator

log = logging.getLogger("mpdp")

MAX_COMMANDS_PER_ROUND = 256     # commands (each up to a chunk of requests) taken per round
MAX_FRAMES_PER_ROUND = 512       # frames read from the ROUTER per round
STATS_EVERY_S = 0.05             # how often the stats snapshot is published
SLOT_CHECK_S = 0.005             # how often the workers' timers are looked at (at most)


@dataclass(slots=True)
class Entry:
    """A pending request: its future, where its partial outputs go, and what is needed to send it again."""

    request: EngineRequest
    future: object                       # a PoolFuture
    ticket: Ticket
    deadline: float | None = None
    sink: Callable[[EngineResult], None] | None = None   # partial results; must not block
    delivered: Delivered | None = None   # what a stream handed its consumer (to continue it)


# Commands from caller threads, as small typed records.
@dataclass(slots=True)
class Submit:
    entries: list[Entry]


@dataclass(slots=True)
class Cancel:
    request_id: int


@dataclass(slots=True)
class Close:
    wait: bool
    reason: str


@dataclass(slots=True)
class PublishStats:
    done: threading.Event


@dataclass(slots=True)
class SetBatchLimit:
    setting: object                      # checked by the caller (batch_limits.check_setting)


class Dispatcher:
    def __init__(self, supervisor_factory, transport: Transport, scheduler: Scheduler, admission: Admission, *,
                 heartbeat_interval: float, heartbeat_timeout: float, ready_timeout: float,
                 shutdown_timeout: float, step_timeout: float | None = None,
                 batch_limits: BatchLimits | None = None, cannot_continue=None):
        self.transport = transport
        self.batch_limits = batch_limits or BatchLimits("off")   # each worker's credit (core/batch_limits.py)
        self.scheduler = scheduler
        self.admission = admission
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout         # None: each engine's own (from READY)
        self.ready_timeout = ready_timeout
        self.shutdown_timeout = shutdown_timeout
        # The engine's cannot_continue where it takes EngineRequest.continuation, else None.
        self.cannot_continue = cannot_continue
        self.start_error: BaseException | None = None
        self.ready = threading.Event()           # set once every worker is READY, or start failed
        self.stopped = threading.Event()
        self.dropped_frames = 0
        self.snapshot: dict = {}                 # published for stats(); replaced, never mutated
        self._commands: deque = deque()
        self._woken = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        # Closed only when the dispatcher is collected: a late post() must never write to a reused fd.
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._pending: dict[int, Entry] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._num_deadlines = 0                  # pending entries that have a deadline
        self._resolved = 0                       # resolved this round, reported to admission once
        self._ever_running = False
        self._last_stats = 0.0
        # The workers' timers (heartbeats, step budgets, pings, starts) are seconds long: looked at
        # every SLOT_CHECK_S, not every round (a round can be one request under light load).
        self._slot_check_s = min(SLOT_CHECK_S, heartbeat_interval / 10)
        self._next_slot_check = 0.0
        self._slot_check_due = False             # a round skipped the check: it is owed
        self._ctx = zmq.Context()
        self._auth = None
        try:
            self._auth = start_curve_authenticator(self._ctx, transport.curve) if transport.curve else None
            self._router = transport.bind_router(self._ctx)
            self.supervisor: Supervisor = supervisor_factory(transport.endpoint)
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self._ctx.destroy(linger=0)
            transport.cleanup()
            raise
        self.slots: list[Slot] = self.supervisor.slots
        self._by_identity: dict[bytes, Slot] = {}
        self._sentinels_changed = False          # a worker started: its sentinel joins the poll
        self._publish_stats(0.0)
        self._thread = threading.Thread(target=self._run, name="mpdp-dispatcher", daemon=True)
        self._thread.start()

    # -- called from caller threads ---------------------------------------------------------------
    def post(self, command) -> None:
        self._commands.append(command)
        if not self._woken:                  # order matters: see _drain_commands
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:                  # closed: the dispatcher is gone
                pass

    def cancel(self, request_id: int) -> None:
        self.post(Cancel(request_id))

    def fresh_snapshot(self, timeout: float = 2.0) -> dict:
        """The stats as of the dispatcher's next round (or the last published, if it is gone)."""
        if not self.is_dispatcher_thread() and not self.stopped.is_set():
            done = threading.Event()
            self.post(PublishStats(done))
            done.wait(timeout)
        return self.snapshot

    def is_dispatcher_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        sentinels: dict[int, Slot] = {}
        try:
            now = time.monotonic()
            for slot in self.slots:
                if self.supervisor.may_start(slot):
                    self._start(slot, now)
                if self.state == PoolState.BROKEN:
                    return
            while True:
                if self._sentinels_changed:
                    self._sentinels_changed = False
                    self._sync_sentinels(poller, sentinels)
                events = dict(poller.poll(self._poll_timeout_ms()))
                now = time.monotonic()
                # One round of work on bursts of small objects while many futures are alive:
                # the cycle collector resumes while the thread waits in poll (see gcpause.py).
                with gc_paused():
                    if self._router in events:
                        self._drain_router(now)
                    for fd, slot in list(sentinels.items()):
                        if fd in events:
                            poller.unregister(fd)
                            del sentinels[fd]
                            self._on_death(slot, now)
                    if self._wake_r in events or self._commands:
                        self._drain_commands(now)
                    self._check_timers(now)
                    self._dispatch(now)
                    self.admission.resolved(self._resolved)
                    self._resolved = 0
                if now - self._last_stats >= STATS_EVERY_S:
                    self._publish_stats(now)
                if self._finished():
                    break
        except BaseException as exc:         # a bug here must not leave callers waiting forever
            log.exception("mpdp dispatcher failed")
            self._break(errors.PoolBroken(f"the dispatcher failed: {exc!r}"), cause=exc)
        finally:
            self._shutdown_workers()

    @property
    def state(self) -> PoolState:
        return self.admission.state

    def _start(self, slot: Slot, now: float) -> None:
        if self.supervisor.start(slot, now):
            self._sentinels_changed = True
        elif not self._ever_running:
            self._break(errors.WorkerStartError(f"worker {slot.index} {slot.last_error}"))
        elif all(s.state == SlotState.FAILED for s in self.slots):
            self._break(errors.PoolBroken(f"no worker can be started; the last: {slot.last_error}"))

    def _sync_sentinels(self, poller, sentinels: dict) -> None:
        live = {s.handle.sentinel: s for s in self.slots if s.alive and s.handle is not None}
        for fd in set(sentinels) - set(live):
            poller.unregister(fd)
            del sentinels[fd]
        for fd, slot in live.items():
            if fd not in sentinels:
                poller.register(fd, zmq.POLLIN)
                sentinels[fd] = slot

    def _poll_timeout_ms(self) -> int:
        if self._commands:                      # work left over from a bounded round
            return 0
        timeout = min(0.25, self.heartbeat_interval)   # heartbeats, pings and start checks
        if self._deadlines:
            timeout = min(timeout, self._deadlines[0][0] - time.monotonic())
        if self._slot_check_due:
            timeout = min(timeout, self._next_slot_check - time.monotonic() + 0.001)   # ms rounded down
        return max(0, int(timeout * 1000))

    def _drain_commands(self, now: float) -> None:
        # Empty the pipe, drain, clear the flag, and look again before leaving. A command
        # appended after that last look found the flag clear and wrote to the pipe; one
        # appended before it is drained here. Posters that arrive while we drain see the flag
        # still set and write nothing, so a busy dispatcher is not woken once per request.
        # (Clearing the flag before reading the pipe lost wake-ups: a poster could write in
        # between, the read swallowed its byte, the flag stayed set, and every later command
        # sat in the deque unseen.) After MAX_COMMANDS_PER_ROUND the flag stays set and the
        # rest waits for the next round, which polls without blocking while commands remain.
        try:
            os.read(self._wake_r, 65536)
        except BlockingIOError:
            pass
        commands = self._commands
        budget = MAX_COMMANDS_PER_ROUND
        while True:
            while commands:
                if budget <= 0:
                    return
                budget -= 1
                command = commands.popleft()
                if type(command) is Submit:
                    self._accept(command.entries)
                elif type(command) is Cancel:
                    self._cancel(command.request_id)
                elif type(command) is Close:
                    self._close(command.wait, command.reason)
                elif type(command) is PublishStats:
                    self._publish_stats(now)
                    command.done.set()
                elif type(command) is SetBatchLimit:
                    for index, credit in self.batch_limits.set(command.setting).items():
                        self.scheduler.set_capacity(index, credit)
            self._woken = False
            if not commands:
                return

    def _accept(self, entries: list[Entry]) -> None:
        if self.state in (PoolState.CLOSED, PoolState.BROKEN):
            exc = errors.PoolClosed(f"the pool is {self.state.value}")
            for e in entries:
                self._fail(e, exc)
            return
        pending, enqueue = self._pending, self.scheduler.enqueue
        for e in entries:
            pending[e.request.id] = e
            enqueue(e.ticket)
            if e.deadline is not None:
                heapq.heappush(self._deadlines, (e.deadline, e.request.id))
                self._num_deadlines += 1

    def _cancel(self, request_id: int) -> None:
        """The caller cancelled the future: forget the request and abort it inside its engine."""
        entry = self._forget(request_id)
        if entry is None:
            return
        self._resolved += 1
        self._abort_in_engine(request_id)

    def _forget(self, request_id: int) -> Entry | None:
        entry = self._pending.pop(request_id, None)
        if entry is not None and entry.deadline is not None:
            self._num_deadlines -= 1
        return entry

    def _abort_in_engine(self, request_id: int) -> None:
        index = self.scheduler.drop(request_id)
        if index is not None:
            self._send(self.slots[index], Tag.ABORT, [request_id])

    # -- from workers -------------------------------------------------------------------------------
    def _drain_router(self, now: float) -> None:
        router = self._router
        for _ in range(MAX_FRAMES_PER_ROUND):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            slot = self._by_identity.get(frames[0]) or self._identify(frames[0])
            if slot is None:                  # unknown or stale identity: drop, count
                self.dropped_frames += 1
                continue
            try:
                tag, body = protocol.decode(frames[1:])
                if tag != Tag.HEARTBEAT and frames[0] == slot.beat_identity:
                    raise errors.ProtocolError(f"a worker's beat socket may send only HEARTBEAT, not {tag.name}")
                slot.last_seen = now
                if tag == Tag.RESULTS:
                    self._on_results(slot, protocol.results_from_wire(body), now)
                elif tag == Tag.READY:
                    self._on_ready(slot, protocol.Ready.from_wire(body), now)
                elif tag == Tag.HEARTBEAT:
                    self._on_heartbeat(slot, protocol.Heartbeat.from_wire(body), now)
                elif tag == Tag.STEPS:
                    self._on_steps(slot, protocol.steps_from_wire(body), now)
                elif tag == Tag.DEAD:
                    slot.last_error = str(body.get("error", "")) if isinstance(body, dict) else str(body)
                else:
                    raise errors.ProtocolError(f"a worker may not send {tag.name}")
            except errors.ProtocolError as exc:
                # A protocol violation drops the peer (the Majordomo rule): it is killed and
                # restarted, its requests retried; nothing it sent can break this loop.
                self.dropped_frames += 1
                log.warning("mpdp: protocol violation from worker %d: %s", slot.index, exc)
                slot.last_error = f"protocol error: {exc}"
                self.supervisor.kill(slot, f"a protocol violation ({exc})")

    def _identify(self, identity: bytes) -> Slot | None:
        for slot in self.slots:
            if identity in (slot.identity, slot.beat_identity) and slot.alive:
                self._by_identity = {i: s for s in self.slots if s.alive for i in (s.identity, s.beat_identity)}
                return slot
        return None

    def _on_heartbeat(self, slot: Slot, beat: protocol.Heartbeat, now: float) -> None:
        # busy_s is a duration: the worker's clock may be another machine's. A heartbeat late in
        # this socket only makes the call look younger, never a slow engine look hung.
        slot.steps = beat.steps
        slot.call = beat.call
        slot.call_since = now - beat.busy_s

    def _on_ready(self, slot: Slot, ready: protocol.Ready, now: float) -> None:
        if slot.state != SlotState.STARTING:
            return
        if ready.capacity < 1 or ready.index != slot.index:
            raise errors.ProtocolError(f"READY with index {ready.index}, capacity {ready.capacity}")
        slot.state = SlotState.READY
        slot.ready_at = slot.last_ping = now
        slot.capacity = ready.capacity
        slot.max_model_len = ready.max_model_len
        slot.kv_cache_tokens = ready.kv_cache_tokens
        slot.step_timeout = self.step_timeout or ready.step_timeout or Engine.step_timeout
        slot.node = ready.node or slot.node
        credit = self.batch_limits.worker_ready(slot.index, slot.capacity, ready.extra)
        self.scheduler.add_worker(slot.index, credit, ready.to_wire())
        log.info("mpdp: worker %d ready (pid %s, capacity %d) after %.1fs",
                 slot.index, ready.pid, slot.capacity, now - slot.started_at)
        if all(s.state == SlotState.READY for s in self.slots) and not self._ever_running:
            self._ever_running = True
            if self.state == PoolState.STARTING:
                self.admission.set_state(PoolState.RUNNING)
            self.ready.set()

    def _on_results(self, slot: Slot, results: list[EngineResult], now: float) -> None:
        pending, finished = self._pending, self.scheduler.finished
        index = slot.index
        for res in results:
            if not res.finished:
                entry = pending.get(res.id)
                if entry is not None and entry.sink is not None:
                    if entry.delivered is None:
                        entry.delivered = Delivered()
                    entry.delivered.add(res)    # checked before the consumer sees it
                    self._feed(entry, res)
                continue
            entry = self._forget(res.id)
            if entry is None:                  # cancelled or timed out meanwhile
                continue
            ticket = finished(index, res.id)
            slot.requests += 1
            slot.tokens += res.completion_tokens
            slot.prompt_tokens += res.prompt_tokens
            if res.cached_tokens is not None:     # vLLM: what its prefix cache saved
                slot.cached_tokens = (slot.cached_tokens or 0) + res.cached_tokens
                if ticket is not None:
                    self.scheduler.policy.reported(ticket, index, res.prompt_tokens, res.cached_tokens)
            if res.error_type:
                self._fail(entry, errors.error_from_wire(res.error_type, res.error or "", res.traceback))
                continue
            completion = new_completion(
                res.texts[0] if res.texts else "", res.finish_reasons[0] if res.finish_reasons else "",
                res.prompt_tokens, res.completion_tokens, index, res.texts, res.finish_reasons,
                res.logprobs, res.cached_tokens)
            if entry.sink is not None:          # the final piece first: see the module docstring
                self._feed(entry, res)
            self._resolve(entry, completion)
        slot.last_result = now

    def _on_steps(self, slot: Slot, body: dict, now: float) -> None:
        # Saturated: requests were waiting for room, so the limit is what bounds this engine.
        credit = self.batch_limits.steps(slot.index, body, self.scheduler.num_waiting > 0, now)
        if credit is not None:
            self.scheduler.set_capacity(slot.index, credit)

    def _feed(self, entry: Entry, res: EngineResult) -> None:
        """Hand ``res`` to the entry's sink. A sink that raises ends its own request: it is aborted
        in its engine and its future fails with the cause; nothing else is touched."""
        try:
            entry.sink(res)
        except Exception as exc:
            entry.sink = None                   # never called again
            rid = entry.request.id
            log.warning("mpdp: the consumer of stream %d failed (%r); the request is aborted", rid, exc)
            if self._pending.get(rid) is entry:
                self._forget(rid)
                self._abort_in_engine(rid)
                failure = errors.StreamConsumerFailed(f"the consumer of stream {rid} failed to take its "
                                                      f"text ({exc!r}); the request was aborted")
                failure.__cause__ = exc
                self._fail(entry, failure)

    # -- deaths, timers -----------------------------------------------------------------------------
    def _on_death(self, slot: Slot, now: float) -> None:
        was_starting = slot.state == SlotState.STARTING
        cause = self.supervisor.reap(slot, now)
        self._by_identity.pop(slot.identity, None)
        self._by_identity.pop(slot.beat_identity, None)
        log.warning("mpdp: %s", cause)
        load = self.scheduler.workers.get(slot.index)
        held = list(load.in_flight) if load is not None else []
        _, failed = self.scheduler.worker_died(slot.index)
        self.batch_limits.worker_gone(slot.index)
        if failed:
            tail = self.supervisor.stderr_tail(slot)   # read the log once, not once per request
            for ticket in failed:
                entry = self._forget(ticket.id)
                if entry is not None:
                    self._fail(entry, errors.WorkerCrashed(
                        f"request {ticket.id} was in flight on {ticket.crashes} workers that died; "
                        f"the last: {cause}", worker=slot.index, exitcode=slot.handle.exitcode,
                        stderr_tail=tail, attempts=ticket.crashes))
        for rid in held:
            entry = self._pending.get(rid)
            if entry is not None and entry.delivered:
                self._continue_stream(entry, slot, cause)
        if was_starting and not self._ever_running:
            self._break(errors.WorkerStartError(f"a worker failed to start: {cause}"))
        elif all(s.state == SlotState.FAILED for s in self.slots):
            self._break(errors.PoolBroken(f"every worker failed to start again; the last: {cause}"))

    def _continue_stream(self, entry: Entry, slot: Slot, cause: str) -> None:
        """A stream that delivered text lost its worker: its retry continues from there (the
        scheduler already requeued it), or, where it cannot, the stream ends here."""
        delivered = entry.delivered
        reason = why_not(entry.request, delivered, self.cannot_continue)
        if reason is None:
            entry.request.continuation = delivered.continuation()
            return
        rid = entry.request.id
        self._forget(rid)
        self.scheduler.drop(rid)
        self._fail(entry, errors.StreamInterrupted(
            f"stream {rid} lost its worker after {sum(delivered.chars)} characters were delivered and cannot "
            f"continue: {reason}; rather than repeat its text from the start it ends here. The worker: {cause}",
            worker=slot.index, exitcode=slot.handle.exitcode if slot.handle else None))

    def _overdue(self, slot: Slot, now: float) -> bool:
        return slot.state == SlotState.READY and (
            now - slot.last_seen > self.heartbeat_timeout
            or (slot.call is not None and now - slot.call_since > slot.step_timeout))

    def _check_timers(self, now: float) -> None:
        if now >= self._next_slot_check:
            self._next_slot_check = now + self._slot_check_s
            self._slot_check_due = False
            self._check_slots(now)
        else:
            self._slot_check_due = True          # the next poll ends by then (_poll_timeout_ms)
        self._expire_deadlines(now)            # a request's own timeout: every round

    def _check_slots(self, now: float) -> None:
        serving = self.state in (PoolState.RUNNING, PoolState.DRAINING, PoolState.STARTING)
        if any(self._overdue(slot, now) for slot in self.slots):
            # Read what is waiting before judging anyone: when this thread itself could not run
            # (a full GC of a large heap in the caller's process took 5 s at load 9 on 2 cores),
            # the poll's events are older than `now`, and the heartbeats sent meanwhile sit
            # unread in the socket. Silence is what the socket does not hold, not what this
            # thread did not get to read.
            self._drain_router(time.monotonic())
        for slot in self.slots:
            if slot.state == SlotState.READY:
                # Liveness and progress apart (worker/beat.py): heartbeats keep coming while an
                # engine computes, so silence means the process is frozen or gone, and only one
                # engine call past its step_timeout means a hung engine. Slow is neither.
                if now - slot.last_seen > self.heartbeat_timeout:
                    self.supervisor.kill(slot, f"no heartbeat for {now - slot.last_seen:.1f}s: its process is "
                                               f"frozen or gone (heartbeat_timeout={self.heartbeat_timeout:g})")
                    slot.last_seen = now          # kill once; the sentinel reports the death
                elif slot.call is not None and now - slot.call_since > slot.step_timeout:
                    step = f" (step {slot.steps})" if slot.call == "step" else ""
                    self.supervisor.kill(slot, f"its engine's {slot.call}{step} ran for {now - slot.call_since:.0f}s "
                                               f"without returning: a hung engine (step_timeout="
                                               f"{slot.step_timeout:g}; raise it if its steps are just slow)")
                    slot.call = None              # kill once
                elif now - slot.last_ping >= self.heartbeat_interval:
                    slot.last_ping = now          # the worker's proof that its dispatcher lives
                    self._send_frames(slot, protocol.encode(Tag.PING, {}), slot.beat_identity)
            elif slot.state == SlotState.STARTING and now - slot.started_at > self.ready_timeout:
                self.supervisor.kill(slot, f"not READY within ready_timeout={self.ready_timeout:g}s "
                                           "(raise ready_timeout if the model is just slow to load)")
                slot.started_at = now
            elif (slot.state == SlotState.DEAD and now >= slot.restart_at and serving
                  and self.supervisor.may_start(slot)):
                self._start(slot, now)

    def _expire_deadlines(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, rid = heapq.heappop(deadlines)
            entry = self._forget(rid)
            if entry is not None:
                self._abort_in_engine(rid)
                self._fail(entry, errors.RequestTimeout(f"request {rid} passed its timeout; aborted"))
        # Finished requests leave their heap entries behind; rebuild once they outnumber the
        # live ones, so the heap stays bounded by what is pending.
        if len(deadlines) > 2 * self._num_deadlines + 1024:
            self._deadlines = [(e.deadline, rid) for rid, e in self._pending.items() if e.deadline is not None]
            heapq.heapify(self._deadlines)

    # -- to workers ---------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        scheduler = self.scheduler
        if not scheduler.waiting and not scheduler.groups:
            return
        pending = self._pending
        for index, tickets in scheduler.schedule().items():
            slot = self.slots[index]
            wire = [protocol.request_to_wire(pending[t.id].request) for t in tickets]
            if slot.first_dispatch is None:
                slot.first_dispatch = now
            messages, too_big = protocol.encode_batches(Tag.SUBMIT, wire)
            for frames in messages:
                self._send_frames(slot, frames)
            for pos in too_big:       # cannot happen for requests checked at submit; never lose one
                rid = tickets[pos].id
                scheduler.finished(index, rid)
                entry = self._forget(rid)
                if entry is not None:
                    self._fail(entry, ValueError(f"request {rid} does not fit one frame "
                                                 f"({protocol.MAX_FRAME_BYTES} bytes)"))

    def _send(self, slot: Slot, tag: Tag, body) -> None:
        self._send_frames(slot, protocol.encode(tag, body))

    def _send_frames(self, slot: Slot, frames: list[bytes], identity: bytes | None = None) -> None:
        try:
            self._router.send_multipart([identity or slot.identity, *frames])
        except zmq.ZMQError as exc:
            # The worker vanished between its death and our noticing: its sentinel will fire
            # and its in-flight requests will be retried then.
            log.debug("mpdp: send to worker %d failed: %s", slot.index, exc)

    # -- resolving futures (exactly once, only here) ----------------------------------------------
    def _resolve(self, entry: Entry, value) -> None:
        entry.future.resolve(value)
        self._resolved += 1

    def _fail(self, entry: Entry, exc: BaseException) -> None:
        entry.future.fail(exc)
        sink, entry.sink = entry.sink, None
        if sink is not None:
            try:
                sink(None)                     # the stream ends; the future holds the error
            except Exception as sink_exc:      # its consumer is gone: nothing more to tell it
                log.debug("mpdp: the consumer of stream %d failed: %r", entry.request.id, sink_exc)
        self._resolved += 1

    # -- lifecycle ----------------------------------------------------------------------------------
    def _close(self, wait: bool, reason: str) -> None:
        """In the dispatcher: a draining pool ends in _finished(); otherwise fail what is pending now."""
        if self.state == PoolState.CLOSED:
            self._fail_all(errors.PoolClosed(reason))

    def _break(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self.start_error = self.start_error or exc
        self.admission.set_state(PoolState.BROKEN)
        self._fail_all(exc)
        self.ready.set()

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        self._num_deadlines = 0
        self.scheduler.waiting.clear()
        self.scheduler.groups.clear()
        for entry in pending.values():
            self._fail(entry, exc)
        self.admission.resolved(self._resolved)
        self._resolved = 0

    def _finished(self) -> bool:
        if self.state == PoolState.DRAINING and not self._pending and not self._commands:
            self.admission.set_state(PoolState.CLOSED)
        return self.state in (PoolState.CLOSED, PoolState.BROKEN)

    def _publish_stats(self, now: float) -> None:
        loads = self.scheduler.workers
        routing_stats = getattr(self.scheduler.policy, "worker_stats", None)   # cache_aware's predictions
        workers = []
        for s in self.slots:
            w = describe(s)
            load = loads.get(s.index)
            w["in_flight"] = len(load.in_flight) if load else 0
            w["outstanding_tokens"] = load.outstanding if load else 0
            if routing_stats is not None:
                w.update(routing_stats(s.index))
            # What its engine is doing, as its last heartbeat said: a slow worker shows here.
            w["engine_call"] = s.call
            w["busy_s"] = round(now - s.call_since, 3) if s.call is not None and s.alive else 0.0
            if load is not None:
                w.update(self.batch_limits.describe(s.index))
            workers.append(w)
        waiting = self.scheduler.num_waiting
        limits = self.batch_limits
        for index, credit in limits.tick(now, len(self._pending), waiting,
                                         sum(len(x.in_flight) for x in loads.values())).items():
            self.scheduler.set_capacity(index, credit)
        self.snapshot = {"workers": workers, "pending": len(self._pending),
                         "waiting": waiting, "dropped_frames": self.dropped_frames,
                         "batch_limit": limits.setting, "underfill": limits.underfill}
        self._last_stats = now

    def _shutdown_workers(self) -> None:
        if self._pending:
            self._fail_all(errors.PoolClosed(f"the pool closed with {len(self._pending)} requests pending"))
        for slot in self.slots:
            if slot.state == SlotState.READY:
                self._send(slot, Tag.SHUTDOWN, {})
            elif slot.state == SlotState.STARTING:
                # Nothing to drain, and it will never see a SHUTDOWN it connects too late for:
                # waiting would cost the whole shutdown_timeout (a worker restarting after a crash).
                self.supervisor.kill(slot, "the pool closed while it was starting")
        try:
            self.supervisor.stop_all(self.shutdown_timeout)
        finally:
            # Anything that raced in after the final state change still gets an answer.
            while self._commands:
                command = self._commands.popleft()
                if type(command) is Submit:
                    for e in command.entries:
                        self._fail(e, errors.PoolClosed(f"the pool is {self.state.value}"))
            self.admission.resolved(self._resolved)
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            self.transport.cleanup()
            self._publish_stats(time.monotonic())
            self.ready.set()
            self.stopped.set()


def finite_deadline(timeout: float | None, now: float) -> float | None:
    """The deadline of a request's ``timeout`` (None or inf: no deadline)."""
    if timeout is None or math.isinf(timeout):
        return None
    return now + timeout


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
