"""The dispatcher thread: the only owner of the ROUTER socket and of the table of pending futures.

Data flow (one box per owner)::

    caller threads                 dispatcher thread                         worker processes
    ──────────────                 ─────────────────                         ────────────────
    pool.submit() ─┐               ┌────────────────────────────────┐
    pool.submit() ─┼─▶ commands ──▶│ pending {id: future}           │ SUBMIT  ┌─▶ DEALER ─ engine 0
    pool.cancel() ─┘   + wake pipe │ Scheduler (pure): credits,     │─ROUTER─┼─▶ DEALER ─ engine 1
                                   │   least-loaded micro-batches   │◀───────┴── RESULTS/HEARTBEAT
    future.result() ◀── set_result─│ Supervisor: sentinels, restart │
                                   └────────────────────────────────┘

Callers never touch a socket: they append to a deque and wake the dispatcher through a pipe
(one write per wake-up, not per request). The dispatcher waits on one poll over the ROUTER,
the wake pipe and every worker's process sentinel, so a dead worker is seen at once, never by
blocking on a data socket. Every future is resolved exactly once, here: when a worker dies, its
in-flight requests (exactly those the scheduler says it held) go back to the queue, or fail
with WorkerCrashed once they have been on ``max_crashes`` dead workers. A request's last
allowed attempt runs isolated from other such suspects (one per worker at a time, next to
fresh work): a request that kills every worker it reaches (a poison pill) therefore fails
alone, and the requests that crashed with it are never failed for its sake.
"""

from __future__ import annotations

import enum
import heapq
import logging
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import zmq

from mpdp import errors, protocol
from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.gcpause import gc_paused
from mpdp.requests import Completion
from mpdp.scheduler import Scheduler, Ticket
from mpdp.supervisor import Slot, SlotState, Supervisor
from mpdp.transport import Transport, start_curve_authenticator

log = logging.getLogger("mpdp")


class PoolState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"     # close(wait=True): no new requests, pending ones finish
    CLOSED = "closed"
    BROKEN = "broken"


@dataclass(slots=True)
class Entry:
    """A pending request: its future and what is needed to send it again after a crash."""

    request: EngineRequest
    future: Future
    ticket: Ticket
    deadline: float | None = None
    crashes: int = 0


_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError,
                "ContextWindowExceeded": errors.ContextWindowExceededError}


class Dispatcher:
    def __init__(self, supervisor_factory, transport: Transport, scheduler: Scheduler, *,
                 heartbeat_timeout: float, ready_timeout: float, max_crashes: int,
                 shutdown_timeout: float):
        self.transport = transport
        self.scheduler = scheduler
        self.heartbeat_timeout = heartbeat_timeout
        self.ready_timeout = ready_timeout
        self.max_crashes = max_crashes
        self.shutdown_timeout = shutdown_timeout
        self.state = PoolState.STARTING
        self.state_lock = threading.Lock()
        self.start_error: BaseException | None = None
        self.ready = threading.Event()           # set once every worker is READY, or start failed
        self.stopped = threading.Event()
        self.dropped_frames = 0
        self.completed = 0                       # resolved futures, written only by this thread
        self.submitted = 0                       # posted requests, written under state_lock
        self.last_id = 0                         # request ids, given under state_lock
        self.space = threading.Condition()       # submitters waiting for max_pending room
        self.space_waiters = 0                   # how many; changed under ``space``
        self._commands: deque = deque()
        self._woken = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        # Closed only when the dispatcher is collected: a late post() must never write to a reused fd.
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._pending: dict[int, Entry] = {}
        self._suspects: deque[Ticket] = deque()  # on their last attempt; see the module docstring
        self._suspect_on: dict[int, int] = {}    # worker index -> the one such suspect it holds
        self._deadlines: list[tuple[float, int]] = []
        self._ctx = zmq.Context()
        self._auth = start_curve_authenticator(self._ctx, transport.curve) if transport.curve else None
        self._router = transport.bind_router(self._ctx)
        self.supervisor: Supervisor = supervisor_factory(transport.endpoint)
        self.slots: list[Slot] = self.supervisor.slots
        self._by_identity: dict[bytes, Slot] = {}
        self._started_since_sync = False         # a worker started: its pidfd joins the poll
        self._thread = threading.Thread(target=self._run, name="mpdp-dispatcher", daemon=True)
        self._thread.start()

    # -- called from caller threads ---------------------------------------------------------------
    def post(self, command: tuple) -> None:
        self._commands.append(command)
        if not self._woken:                  # order matters: see _drain_commands
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:                  # closed: the dispatcher is gone
                pass

    def is_dispatcher_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def num_pending(self) -> int:
        return len(self._pending)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        sentinels: dict[int, Slot] = {}
        now = time.monotonic()
        try:
            for slot in self.slots:          # all workers start in parallel
                self._start(slot, now)
            while True:
                if self._started_since_sync:     # only a start adds a pidfd; a death removes its own
                    self._started_since_sync = False
                    self._sync_sentinels(poller, sentinels)
                events = dict(poller.poll(self._poll_timeout_ms()))
                now = time.monotonic()
                # One round of work on bursts of small objects while many futures are alive:
                # the cycle collector resumes while the thread waits in poll (see gcpause.py).
                with gc_paused():
                    if self._wake_r in events:
                        self._drain_commands(now)
                    if self._router in events:
                        self._drain_router(now)
                    for fd, slot in list(sentinels.items()):
                        if fd in events:
                            poller.unregister(fd)
                            del sentinels[fd]
                            self._on_death(slot, now)
                    self._check_timers(now)
                    self._dispatch(now)
                if self._finished():
                    break
        except BaseException as exc:         # a bug here must not leave callers waiting forever
            log.exception("mpdp dispatcher failed")
            self._break(errors.PoolBroken(f"the dispatcher failed: {exc!r}"), cause=exc)
        finally:
            self._shutdown_workers()

    def _start(self, slot: Slot, now: float) -> None:
        self.supervisor.start(slot, now)
        self._started_since_sync = True

    def _sync_sentinels(self, poller, sentinels: dict) -> None:
        live = {s.process.sentinel: s for s in self.slots if s.alive and s.process is not None}
        for fd in set(sentinels) - set(live):
            poller.unregister(fd)
            del sentinels[fd]
        for fd, slot in live.items():
            if fd not in sentinels:
                poller.register(fd, zmq.POLLIN)
                sentinels[fd] = slot

    def _poll_timeout_ms(self) -> int:
        timeout = 0.25                          # heartbeat and start checks
        if self._deadlines:
            timeout = min(timeout, self._deadlines[0][0] - time.monotonic())
        return max(0, int(timeout * 1000))

    def _drain_commands(self, now: float) -> None:
        # Empty the pipe, drain, clear the flag, and look again before leaving. A command
        # appended after that last look found the flag clear and wrote to the pipe; one
        # appended before it is drained here. Posters that arrive while we drain see the flag
        # still set and write nothing, so a busy dispatcher is not woken once per request.
        # (Clearing the flag before reading the pipe lost wake-ups: a poster could write in
        # between, the read swallowed its byte, the flag stayed set, and every later command
        # sat in the deque unseen.)
        try:
            os.read(self._wake_r, 65536)
        except BlockingIOError:
            pass
        commands = self._commands
        while True:
            while commands:
                kind, arg = commands.popleft()
                if kind == "submit":
                    self._accept(arg, now)
                elif kind == "cancel":
                    self._cancel(arg)
                elif kind == "close":
                    self._close(*arg)
            self._woken = False
            if not commands:
                return

    def _accept(self, entries: list[Entry], now: float) -> None:
        if self.state not in (PoolState.RUNNING, PoolState.STARTING, PoolState.DRAINING):
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

    def _cancel(self, request_id: int) -> None:
        """The caller cancelled the future: forget the request and abort it inside its engine."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        self._count_resolved()
        self._abort_in_engine(request_id)

    def _abort_in_engine(self, request_id: int) -> None:
        index = self.scheduler.drop(request_id)
        if index is not None:
            self._release_suspect(index, request_id)
            self._send(self.slots[index], protocol.ABORT, [request_id])

    # -- from workers -------------------------------------------------------------------------------
    def _drain_router(self, now: float) -> None:
        router = self._router
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            slot = self._by_identity.get(frames[0])
            if slot is None:
                slot = self._identify(frames[0])
            if slot is None:                  # unknown or stale identity: drop, count
                self.dropped_frames += 1
                continue
            try:
                tag, body = protocol.decode(frames[1:])
            except errors.ProtocolError as exc:
                self.dropped_frames += 1
                log.warning("mpdp: dropped a frame from worker %d: %s", slot.index, exc)
                if slot.state == SlotState.STARTING:
                    slot.last_error = f"protocol error: {exc}"
                    self.supervisor.kill(slot, f"a protocol error ({exc})")
                continue
            slot.last_seen = now
            if tag == protocol.RESULTS:
                self._on_results(slot, body, now)
            elif tag == protocol.READY:
                self._on_ready(slot, body, now)
            elif tag == protocol.DEAD:
                slot.last_error = body.get("error", "") if isinstance(body, dict) else str(body)

    def _identify(self, identity: bytes) -> Slot | None:
        for slot in self.slots:
            if slot.identity == identity and slot.alive:
                self._by_identity = {s.identity: s for s in self.slots if s.alive}
                return slot
        return None

    def _on_ready(self, slot: Slot, body: dict, now: float) -> None:
        if slot.state != SlotState.STARTING:
            return
        slot.state = SlotState.READY
        slot.ready_at = now
        slot.capacity = int(body["capacity"])
        slot.max_model_len = body.get("max_model_len")
        self.scheduler.add_worker(slot.index, slot.capacity)
        log.info("mpdp: worker %d ready (pid %s, capacity %d) after %.1fs",
                 slot.index, body.get("pid"), slot.capacity, now - slot.started_at)
        if self.state == PoolState.STARTING and all(s.state == SlotState.READY for s in self.slots):
            self._set_state(PoolState.RUNNING)
            self.ready.set()

    def _on_results(self, slot: Slot, items: list, now: float) -> None:
        pending, finished = self._pending, self.scheduler.finished
        index = slot.index
        for item in items:
            res = protocol.result_from_wire(item)
            entry = pending.pop(res.id, None)
            if entry is None:                  # cancelled or timed out meanwhile
                continue
            finished(index, res.id)
            if self._suspect_on:
                self._release_suspect(index, res.id)
            slot.requests += 1
            slot.tokens += res.completion_tokens
            slot.prompt_tokens += res.prompt_tokens
            if res.error_type:
                self._fail(entry, _ERROR_TYPES.get(res.error_type, errors.EngineError)(res.error))
            else:
                self._resolve(entry, Completion(
                    res.texts[0] if res.texts else "", res.finish_reasons[0] if res.finish_reasons else "",
                    res.prompt_tokens, res.completion_tokens, index, res.texts, res.finish_reasons,
                    res.logprobs))
        slot.last_result = now

    # -- deaths, timers -----------------------------------------------------------------------------
    def _on_death(self, slot: Slot, now: float) -> None:
        was_starting = slot.state == SlotState.STARTING
        cause = self.supervisor.reap(slot, now)
        self._by_identity.pop(slot.identity, None)
        log.warning("mpdp: %s", cause)
        self._suspect_on.pop(slot.index, None)
        requeue, last_try = [], []
        tail = None                            # read the log once, not once per failed request
        for ticket in self.scheduler.remove_worker(slot.index):
            entry = self._pending.get(ticket.id)
            if entry is None:
                continue
            entry.crashes += 1
            if entry.crashes >= self.max_crashes:
                del self._pending[ticket.id]
                if tail is None:
                    tail = self.supervisor.stderr_tail(slot)
                self._fail(entry, errors.WorkerCrashed(
                    f"request {ticket.id} was in flight on {entry.crashes} workers that died; "
                    f"the last: {cause}", worker=slot.index, exitcode=slot.process.exitcode,
                    stderr_tail=tail, attempts=entry.crashes))
            elif entry.crashes == self.max_crashes - 1:
                last_try.append(ticket)
            else:
                requeue.append(ticket)
        self.scheduler.enqueue_front(requeue)
        self._suspects.extend(last_try)
        if was_starting and self.state == PoolState.STARTING:
            self._break(errors.WorkerStartError(f"a worker failed to start: {cause}"))
        elif not any(s.state != SlotState.FAILED for s in self.slots):
            self._break(errors.PoolBroken(f"every worker failed to start again; the last: {cause}"))

    def _check_timers(self, now: float) -> None:
        for slot in self.slots:
            if slot.state == SlotState.READY and now - slot.last_seen > self.heartbeat_timeout:
                self.supervisor.kill(slot, f"no heartbeat for {now - slot.last_seen:.1f}s (hung engine?)")
                slot.last_seen = now              # kill once; the sentinel reports the death
            elif slot.state == SlotState.STARTING and now - slot.started_at > self.ready_timeout:
                self.supervisor.kill(slot, f"not READY within ready_timeout={self.ready_timeout:g}s "
                                           "(raise ready_timeout if the model is just slow to load)")
                slot.started_at = now
            elif (slot.state == SlotState.DEAD and now >= slot.restart_at
                  and self.state in (PoolState.RUNNING, PoolState.DRAINING)):
                self._start(slot, now)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, rid = heapq.heappop(deadlines)
            entry = self._pending.pop(rid, None)
            if entry is not None:
                self._abort_in_engine(rid)
                self._fail(entry, errors.RequestTimeout(f"request {rid} passed its timeout; aborted"))

    # -- to workers ---------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        if self._suspects:
            self._dispatch_suspects(now)
        if not self.scheduler.waiting:
            return
        pending = self._pending
        for index, tickets in self.scheduler.schedule().items():
            self._submit(self.slots[index], [protocol.request_to_wire(pending[t.id].request) for t in tickets], now)

    def _dispatch_suspects(self, now: float) -> None:
        """Give each worker that holds no suspect on its last attempt one more, if it has credit."""
        for index, load in self.scheduler.workers.items():
            if not self._suspects:
                return
            if index in self._suspect_on or load.free <= 0:
                continue
            while self._suspects:
                ticket = self._suspects.popleft()
                entry = self._pending.get(ticket.id)
                if entry is None:              # cancelled or timed out while it waited
                    continue
                self.scheduler.assign(index, ticket)
                self._suspect_on[index] = ticket.id
                self._submit(self.slots[index], [protocol.request_to_wire(entry.request)], now)
                break

    def _release_suspect(self, index: int, request_id: int) -> None:
        if self._suspect_on.get(index) == request_id:
            del self._suspect_on[index]

    def _submit(self, slot: Slot, wire: list, now: float) -> None:
        if slot.first_dispatch is None:
            slot.first_dispatch = now
        self._send(slot, protocol.SUBMIT, wire)

    def _send(self, slot: Slot, tag: int, body) -> None:
        try:
            self._router.send_multipart([slot.identity, *protocol.encode(tag, body)])
        except zmq.ZMQError as exc:
            # The worker vanished between its death and our noticing: its sentinel will fire
            # and its in-flight requests will be requeued then.
            log.debug("mpdp: send to worker %d failed: %s", slot.index, exc)

    # -- resolving futures (exactly once, only here) ----------------------------------------------
    def _resolve(self, entry: Entry, value) -> None:
        try:
            entry.future.set_result(value)
        except InvalidStateError:              # cancelled by the caller meanwhile
            pass
        self._count_resolved()

    def _fail(self, entry: Entry, exc: BaseException) -> None:
        try:
            entry.future.set_exception(exc)
        except InvalidStateError:
            pass
        self._count_resolved()

    def _count_resolved(self) -> None:
        self.completed += 1
        if self.space_waiters:
            with self.space:
                self.space.notify_all()

    # -- lifecycle ----------------------------------------------------------------------------------
    def _set_state(self, state: PoolState) -> None:
        with self.state_lock:
            self.state = state

    def begin_close(self, wait: bool) -> bool:
        """From the caller: stop taking requests now (so submit raises at once). False if already closed."""
        with self.state_lock:
            if self.state in (PoolState.CLOSED, PoolState.BROKEN):
                return False
            self.state = PoolState.DRAINING if wait and self.state == PoolState.RUNNING else PoolState.CLOSED
            return True

    def _close(self, wait: bool, reason: str) -> None:
        """In the dispatcher: a draining pool ends in _finished(); otherwise fail what is pending now."""
        if self.state == PoolState.CLOSED:
            self._fail_all(errors.PoolClosed(reason))

    def _break(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        self.start_error = self.start_error or exc
        self._set_state(PoolState.BROKEN)
        self._fail_all(exc)
        self.ready.set()

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        self.scheduler.waiting.clear()
        self._suspects.clear()
        for entry in pending.values():
            self._fail(entry, exc)

    def _finished(self) -> bool:
        if self.state == PoolState.DRAINING and not self._pending and not self._commands:
            self._set_state(PoolState.CLOSED)
        return self.state in (PoolState.CLOSED, PoolState.BROKEN)

    def _shutdown_workers(self) -> None:
        if self._pending:
            self._fail_all(errors.PoolClosed(f"the pool closed with {len(self._pending)} requests pending"))
        for slot in self.slots:
            if slot.state == SlotState.READY:
                self._send(slot, protocol.SHUTDOWN, {})
            elif slot.state == SlotState.STARTING:
                # Nothing to drain, and it will never see a SHUTDOWN it connects too late for:
                # waiting would cost the whole shutdown_timeout (a worker restarting after a crash).
                self.supervisor.kill(slot, "the pool closed while it was starting")
        self.supervisor.stop_all(self.shutdown_timeout)
        # Anything that raced in after the final state change still gets an answer.
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "submit":
                for e in arg:
                    self._fail(e, errors.PoolClosed(f"the pool is {self.state.value}"))
        self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self.transport.cleanup()
        self.ready.set()
        self.stopped.set()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
