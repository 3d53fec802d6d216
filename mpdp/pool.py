"""``mpdp.Pool``: the public face. Checks requests in the caller's thread, hands them to the dispatcher.

One request's path, file by file::

    Pool.submit()            pool.py            validate (requests.py, config.py), admit (core/admission.py)
      └─ Submit command ──▶  core/dispatcher.py pending table; Scheduler.schedule() (routing/)
           └─ SUBMIT frame ─▶ wire/protocol.py  over the ROUTER (wire/transport.py) to a worker
                worker/loop.py  engine.add(); engine.step() (engines/)
           ◀─ RESULTS frame ── partial results to the request's sink (stream()), the final one
      ◀─ future.set_result ── core/dispatcher.py  (done-callbacks on their own thread: core/futures.py)

Workers come from a launcher (``launch/``: local processes, or Ray actors) and are watched and
restarted by ``core/supervisor.py``. Every method here is safe to call from any number of
threads. Backpressure: at most ``max_pending`` requests are pending at once; ``submit`` and
``generate`` block (never drop) until there is room, ``agenerate`` waits without blocking
its event loop, and ``imap`` streams an iterator of any length through a bounded window.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import queue
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from mpdp import errors
from mpdp.config import DEFAULT_MODEL, PoolConfig, SamplingParams, split_settings
from mpdp.core import batch_limits, kv_events
from mpdp.core.admission import Admission, PoolState
from mpdp.core.batch_limits import BatchLimits
from mpdp.core.dispatcher import Close, Dispatcher, Entry, SetBatchLimit, Submit, finite_deadline
from mpdp.core.futures import PoolFuture, failed_future
from mpdp.core.supervisor import LaunchConfig, Supervisor, plan_slots
from mpdp.engines import check_sampling, engine_class, resolve_model
from mpdp.engines.base import EngineResult
from mpdp.gcpause import gc_paused
from mpdp.launch import make_launcher
from mpdp.launch.local import visible_gpus
from mpdp.requests import Completion, build_request, check_timeout, estimate_cost
from mpdp.routing import Scheduler, Ticket, make_policy
from mpdp.wire.transport import Transport

_CHUNK = 4096          # requests per command posted by generate(): one wake-up per chunk


def default_engine() -> str:
    """vLLM where it is installed and a GPU is visible, else transformers on the CPU."""
    if importlib.util.find_spec("vllm") is not None and visible_gpus():
        return "vllm"
    return "hf"


class Pool:
    """A data-parallel pool of engines, one per worker (per GPU, or per tensor-parallel group).

    ``Pool(model, engine="hf", num_workers=2)`` on CPU; ``Pool(model, engine="vllm", num_gpus=4)``
    on GPUs; ``Pool(config=PoolConfig(...))`` from a typed configuration. A keyword that names
    a ``PoolConfig`` field is a pool setting; any other is a sampling keyword (vLLM
    ``SamplingParams`` names), a default that each request may override. Everything that needs
    no engine (settings, sampling values, the engine's options) is checked here, before any
    worker starts.
    """

    def __init__(self, model: str = DEFAULT_MODEL, engine: str | None = None, num_workers: int | None = None,
                 num_gpus: int | None = None, tensor_parallel_size: int = 1, engine_options: dict | None = None,
                 *, config: PoolConfig | None = None, transport: str | Transport = "ipc", **kwargs):
        settings, kwargs = split_settings(kwargs)
        if config is None:
            transport_kind = transport if isinstance(transport, str) else transport.kind
            sampling = settings.pop("sampling", None) or {}          # sampling={...}, then keywords
            sampling = {**(sampling.to_dict() if isinstance(sampling, SamplingParams) else sampling), **kwargs}
            config = PoolConfig(model=model, engine=engine, num_workers=num_workers, num_gpus=num_gpus,
                                tensor_parallel_size=tensor_parallel_size,
                                engine_options=dict(engine_options or {}), transport=transport_kind,
                                sampling=SamplingParams.from_dict(sampling), **settings)
        elif kwargs or settings:
            raise TypeError("give either config= or keyword settings, not both")
        self._owner_pid = os.getpid()
        self.config = config
        self.engine = config.engine or default_engine()
        self.engine_info = engine_cls = engine_class(self.engine)
        engine_cls.check_options(config.engine_options)
        check_sampling(engine_cls, config.sampling.to_dict())
        self.sampling = config.sampling
        self.defaults = config.sampling.to_dict()     # the wire form; each request starts from it
        self.max_pending = config.max_pending
        self._policy = make_policy(config.routing, config.routing_options)
        options = dict(config.engine_options)
        slots = self._plan(engine_cls, config, options)
        self.model = resolve_model(self.engine, config.model, options)
        self.num_workers = len(slots)
        # Workers on other machines (launcher="ray") connect over tcp, always with Curve, to the
        # address the launcher names; a local launcher is made only once the endpoint is bound.
        remote = make_launcher(config) if config.launcher != "local" else None
        self._kv_events = None
        self._admission = admission = Admission(config.max_pending)
        launch = LaunchConfig(self.engine, self.model, options, config.heartbeat_interval,
                              config.dispatcher_timeout, dict(config.worker_env))

        def supervisor(endpoint: str) -> Supervisor:
            return Supervisor(slots, launch, remote or make_launcher(config), endpoint, transport.curve,
                              [transport.folder] if transport.folder else [])

        # From here a remote launcher holds its cluster (a Ray it connected to): whatever fails
        # before the dispatcher owns it (a refused transport host, Ctrl-C) must let go of it.
        try:
            if isinstance(transport, str):
                transport = Transport(kind="tcp" if remote else config.transport,
                                      host=remote.bind_host if remote else config.transport_host,
                                      port=config.transport_port)
            # cache_aware with events=True on vLLM: the engines publish their KV-cache events, a
            # thread keeps an exact index.
            self._kv_events = kv_events.attach(self._policy, engine_cls, self.model, options, remote is not None)
            self._dispatcher = d = Dispatcher(
                supervisor, transport, Scheduler(self._policy, max_batch=config.max_batch,
                                                 max_crashes=config.max_crashes), admission,
                heartbeat_interval=config.heartbeat_interval,
                heartbeat_timeout=config.heartbeat_timeout or engine_cls.heartbeat_timeout,
                step_timeout=config.step_timeout,
                ready_timeout=config.ready_timeout or engine_cls.ready_timeout,
                shutdown_timeout=config.shutdown_timeout,
                batch_limits=BatchLimits(batch_limits.resolve(config.batch_limit, engine_cls)),
                cannot_continue=engine_cls.cannot_continue if engine_cls.continues_streams else None)
        except BaseException:          # a refused setting, an endpoint not bound: nothing may stay behind
            if remote is not None:
                remote.close()
            if self._kv_events is not None:
                self._kv_events.close()
            raise
        # Runs on close(), garbage collection or interpreter exit, and when the start fails; holds
        # no reference to the pool. It stops the KV-event listener too.
        self._finalizer = weakref.finalize(self, _shutdown, d, False, 10.0, self._owner_pid, self._kv_events)
        if config.wait_ready:
            try:
                d.ready.wait()
            except BaseException:          # Ctrl-C while engines load
                self._finalizer()
                raise
            if d.start_error is not None:
                self._finalizer()
                raise d.start_error

    @staticmethod
    def _plan(engine_cls, config: PoolConfig, options: dict):
        tp, num_gpus, gpus = config.tensor_parallel_size, config.num_gpus, config.gpus
        if not engine_cls.uses_gpu:
            if num_gpus or gpus:
                raise ValueError(f"the {engine_cls.name!r} engine runs on CPU: give num_workers, not num_gpus/gpus")
            return plan_slots(config.num_workers or min(4, os.cpu_count() or 1), None, 1)
        options.setdefault("tensor_parallel_size", tp)
        if config.launcher != "local":       # the cluster places GPUs (Ray sets each actor's)
            count = config.num_workers or (num_gpus or tp) // tp
            return plan_slots(count, None, 1)
        visible = visible_gpus()
        if gpus is not None:
            try:
                chosen = [visible[i] for i in gpus]
            except IndexError:
                raise ValueError(f"gpus={gpus!r} must index the {len(visible)} visible GPUs") from None
        else:
            chosen = visible[:num_gpus] if num_gpus else visible
        if num_gpus and len(chosen) < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but only {len(visible)} GPUs are visible")
        if not chosen:
            raise ValueError("no GPU is visible: use engine='hf' on CPU, or set CUDA_VISIBLE_DEVICES")
        if len(chosen) % tp:
            raise ValueError(f"{len(chosen)} GPUs do not split into groups of tensor_parallel_size={tp}")
        return plan_slots(config.num_workers or len(chosen) // tp, chosen, tp)

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, timeout: float | None = None,
               **sampling) -> Future:
        """One request; returns a Future of a ``Completion``. Bad input raises here, at once."""
        params = self._params(sampling)
        return self._post([self._entry(prompt, messages, prompt_token_ids, params, timeout)])[0]

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, timeout: float | None = None,
               **sampling) -> "Stream":
        """One request whose text arrives as the engine decodes it: iterate the ``Stream`` for
        ``Delta``s; ``stream.result()`` is the ``Completion``."""
        s = Stream()
        entry = self._entry(prompt, messages, prompt_token_ids, self._params(sampling), timeout, stream=True)
        entry.sink = s._queue.put
        s.future = self._post([entry])[0]
        return s

    async def astream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None, timeout: float | None = None,
                      **sampling) -> "AsyncStream":
        """``stream`` for asyncio: ``async for delta in await pool.astream(...)``; waits for room
        without blocking the event loop."""
        loop = asyncio.get_running_loop()
        s = AsyncStream(loop)
        entry = self._entry(prompt, messages, prompt_token_ids, self._params(sampling), timeout, stream=True)
        entry.sink = s._push
        s.future = (await self._apost([entry]))[0]
        return s

    def generate(self, items: Iterable[Any], *, timeout: float | None = None,
                 return_exceptions: bool = False, **sampling) -> list[Completion]:
        """Many requests; results in input order. Items: a prompt string, a messages list, or a dict
        with ``prompt``/``messages``/``prompt_token_ids`` and per-item sampling overrides. With
        ``return_exceptions=True`` a bad item's error takes its place, as in ``imap``."""
        futures = self._submit_items(items, timeout, sampling, return_exceptions)
        return [_outcome(f, return_exceptions) for f in futures]

    async def agenerate(self, items: Iterable[Any], *, timeout: float | None = None,
                        return_exceptions: bool = False, **sampling) -> list[Completion]:
        params = self._params(sampling)
        futures: list[Future] = []
        try:
            for chunk in self._chunks(items, params, timeout, return_exceptions):
                futures.extend(await self._apost(chunk))
        except BaseException:
            _cancel_all(futures)
            raise
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures),
                                    return_exceptions=return_exceptions)

    async def asubmit(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None, timeout: float | None = None,
                      **sampling) -> Completion:
        """``submit`` for asyncio: the ``Completion`` itself; waits for room without blocking the
        event loop."""
        entry = self._entry(prompt, messages, prompt_token_ids, self._params(sampling), timeout)
        (future,) = await self._apost([entry])
        return await asyncio.wrap_future(future)

    def imap(self, items: Iterable[Any], *, window: int | None = None, timeout: float | None = None,
             return_exceptions: bool = False, **sampling) -> Iterator[Completion]:
        """Stream results in input order over an iterator of any length, at most ``window`` in flight.
        Leaving the loop early (break, close(), an exception) cancels what is still in flight."""
        window = window or min(self.max_pending, 8192)
        params = self._params(sampling)
        in_flight: list[Future] = []
        head = 0
        try:
            for item in items:
                try:
                    future = self._post([self._item_entry(item, params, timeout)])[0]
                except (ValueError, TypeError) as exc:
                    if not return_exceptions:
                        raise
                    future = failed_future(exc)
                in_flight.append(future)
                if len(in_flight) - head >= window:
                    yield _outcome(in_flight[head], return_exceptions)
                    head += 1
                    if head > 4096:            # keep the list short without a deque's cost per item
                        del in_flight[:head]
                        head = 0
            while head < len(in_flight):
                yield _outcome(in_flight[head], return_exceptions)
                head += 1
        finally:
            _cancel_all(in_flight[head:])

    def _chunks(self, items, params, timeout, return_exceptions) -> Iterator[list[Entry | Future]]:
        items = iter(items)
        size = min(_CHUNK, self.max_pending)       # a bigger chunk than max_pending never finds room
        while True:
            with gc_paused():
                chunk = []
                for item in itertools.islice(items, size):
                    try:
                        chunk.append(self._item_entry(item, params, timeout))
                    except (ValueError, TypeError) as exc:
                        if not return_exceptions:
                            raise
                        chunk.append(failed_future(exc))
            if not chunk:
                return
            yield chunk

    def _submit_items(self, items, timeout, sampling, return_exceptions) -> list[Future]:
        """Validate and post in chunks, so the workers start on the first chunk while later
        ones are still being built. A bad item further on raises after the earlier chunks
        went out (their futures are cancelled, so nothing is left running), unless
        ``return_exceptions``, where its error takes its place."""
        params = self._params(sampling)
        futures: list[Future] = []
        try:
            for chunk in self._chunks(items, params, timeout, return_exceptions):
                futures.extend(self._post(chunk))
        except BaseException:
            _cancel_all(futures)
            raise
        return futures

    def _item_entry(self, item, params, timeout) -> Entry:
        if isinstance(item, str):
            return self._entry(item, None, None, params, timeout)
        if isinstance(item, (list, tuple)):
            return self._entry(None, item, None, params, timeout)
        if isinstance(item, dict):
            item = dict(item)
            prompt, messages, ids = item.pop("prompt", None), item.pop("messages", None), \
                item.pop("prompt_token_ids", None)
            item_timeout = item.pop("timeout", timeout)
            return self._entry(prompt, messages, ids, self._params(item, base=params) if item else params,
                               item_timeout)
        raise TypeError(f"each item must be a prompt string, a messages list or a dict, "
                        f"not {type(item).__name__}")

    def _params(self, sampling: dict, base: dict | None = None) -> dict:
        """The wire params: defaults, with validated overrides. Validated once, here."""
        if base is None:
            base = self.defaults
        if not sampling:
            return base
        checked = check_sampling(self.engine_info, sampling)
        merged = dict(base)
        merged.update(checked)
        return merged

    def _entry(self, prompt, messages, ids, params, timeout, stream: bool = False) -> Entry:
        if timeout is not None:              # the common case costs no call (once per request)
            check_timeout(timeout)
        request = build_request(0, prompt, messages, ids, params)   # the id is given in _post
        request.stream = stream
        return Entry(request, PoolFuture(0, self._dispatcher.cancel),
                     Ticket(0, estimate_cost(request), self._policy.route_key(request)),
                     finite_deadline(timeout, time.monotonic()))

    def _post(self, entries: list) -> list[Future]:
        """Admit (waiting for room), number and hand over. Items already failed are passed through."""
        self._check_process()
        real = [e for e in entries if isinstance(e, Entry)]
        if real:
            first = self._admission.admit(len(real))
            for i, e in enumerate(real, first):
                e.request.id = e.ticket.id = e.future.request_id = i
            self._dispatcher.post(Submit(real))
        return [e.future if isinstance(e, Entry) else e for e in entries]

    async def _apost(self, entries: list) -> list[Future]:
        real = sum(isinstance(e, Entry) for e in entries)
        if self._admission.has_room(real):
            return self._post(entries)
        return await asyncio.to_thread(self._post, entries)   # wait for room off the event loop

    def _check_process(self) -> None:
        if os.getpid() != self._owner_pid:
            raise errors.PoolBroken(f"this pool belongs to process {self._owner_pid}; a forked child "
                                    "cannot use it (its dispatcher thread and workers stayed in the "
                                    "parent): create a new Pool in the child")

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop the pool. ``wait=True`` finishes pending requests first; ``wait=False`` or
        ``cancel_pending=True`` fails them with PoolClosed and aborts them in the engines."""
        if os.getpid() != self._owner_pid:
            return
        _shutdown(self._dispatcher, wait and not cancel_pending, timeout, self._owner_pid)
        self._finalizer()         # kills leftovers, stops the KV-event listener; runs once

    async def aclose(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """``close`` for asyncio: waits for the pool to stop without blocking the event loop."""
        await asyncio.to_thread(self.close, wait, cancel_pending=cancel_pending, timeout=timeout)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception (Ctrl-C included) do not wait for pending work.
        self.close(wait=exc_type is None)

    async def __aenter__(self) -> "Pool":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.aclose(wait=exc_type is None)

    @property
    def state(self) -> str:
        return self._admission.state.value

    @property
    def closed(self) -> bool:
        return self._admission.state in (PoolState.CLOSED, PoolState.BROKEN)

    @property
    def start_error(self) -> BaseException | None:
        """Why the workers could not start (the pool is then broken), or None."""
        return self._dispatcher.start_error

    def set_batch_limit(self, batch_limit: str | int) -> None:
        """Change how many requests each engine holds, at run time: "auto", "adaptive", "off" or
        an int (see PoolConfig.batch_limit). Requests in flight are untouched."""
        setting = batch_limits.resolve(batch_limit, self.engine_info)
        self._dispatcher.post(SetBatchLimit(setting))

    def stats(self) -> dict[str, Any]:
        """A snapshot the dispatcher publishes in its next round."""
        a, snap = self._admission, self._dispatcher.fresh_snapshot()
        return {"state": a.state.value, "engine": self.engine, "model": self.model, **snap,
                "submitted": a.submitted, "completed": a.completed}


@dataclass(slots=True, frozen=True)
class Delta:
    """New text of a streamed request: one entry per choice ("" where a choice has nothing new),
    and the request's token counts so far (usage on every chunk, for a server that reports it)."""

    texts: list[str]
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _StreamBase:
    future: Future

    def __init__(self):
        self._sent: list[int] = []

    def _delta(self, res: EngineResult | None) -> Delta | None:
        """A partial result is a delta already; the final one carries whole texts: send the rest."""
        if res is None:
            return None
        if not res.finished:
            if len(self._sent) < len(res.texts):
                self._sent.extend([0] * (len(res.texts) - len(self._sent)))
            for i, t in enumerate(res.texts):
                self._sent[i] += len(t)
            return Delta(list(res.texts), False, res.prompt_tokens, res.completion_tokens)
        self._sent.extend([0] * (len(res.texts) - len(self._sent)))
        return Delta([t[self._sent[i]:] for i, t in enumerate(res.texts)], True, res.prompt_tokens,
                     res.completion_tokens)

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)

    def cancel(self) -> bool:
        return self.future.cancel()


class Stream(_StreamBase):
    """Iterate for ``Delta``s; ends after the final one (or raises the request's error)."""

    def __init__(self):
        super().__init__()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Delta]:
        # The dispatcher hands over the final piece before it resolves the future (and fails the
        # future before it sends None): a future seen done with nothing queued has no piece left.
        ended = False
        try:
            while True:
                try:
                    res = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self.future.done() and self._queue.empty():
                        ended = True
                        self.future.result(0)      # raises its error (cancelled, closed)
                        return
                    continue
                delta = self._delta(res)
                if delta is None:
                    ended = True
                    self.future.result(0)
                    return
                ended = delta.finished
                yield delta
                if ended:
                    return
        finally:
            if not ended:
                self.future.cancel()               # the consumer left: abort it in the engine


class AsyncStream(_StreamBase):
    """``async for delta in stream``; leaving early cancels the request in its engine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def _push(self, res: EngineResult | None) -> None:     # on the dispatcher thread: never blocks
        self._loop.call_soon_threadsafe(self._queue.put_nowait, res)

    def waiting(self) -> int:
        """Deltas arrived and not read yet: a reader that fell behind may join them."""
        return self._queue.qsize()

    async def __aiter__(self):
        ended = False
        try:
            while True:
                delta = self._delta(await self._queue.get())
                if delta is None:
                    ended = True
                    await asyncio.wrap_future(self.future)   # raises its error
                    return
                ended = delta.finished           # the future resolves just after the final piece
                yield delta
                if ended:
                    return
        finally:
            if not ended:
                self.future.cancel()


def _outcome(future: Future, return_exceptions: bool):
    if return_exceptions:
        exc = future.exception()
        return exc if exc is not None else future.result()
    return future.result()


def _cancel_all(futures) -> None:
    for f in futures:
        f.cancel()


def _shutdown(d: Dispatcher, wait: bool, timeout: float | None, owner_pid: int, listener=None) -> None:
    if os.getpid() != owner_pid:         # a forked child's exit must not touch the parent's pool
        return
    if d.admission.begin_close(wait):
        d.post(Close(wait, "the pool was closed with this request pending"))
    # A future's done-callback no longer runs on the dispatcher thread, but a sink does:
    # waiting there for the dispatcher to stop would wait for itself.
    if not d.is_dispatcher_thread():
        d.stopped.wait(timeout)
    if listener is not None:             # the KV-event listener's thread and socket
        listener.close()
