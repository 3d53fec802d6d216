"""``mpdp.Pool``: the public face. Checks requests in the caller's thread, hands them to the dispatcher.

Every method here is safe to call from any number of threads: callers only validate, create
futures, and append to the dispatcher's command queue (see ``mpdp/dispatcher.py`` for the
data flow). Results come back as ``concurrent.futures.Future`` objects resolved by the
dispatcher thread; batch calls return in input order.

Backpressure: at most ``max_pending`` requests are pending at once; ``submit`` and
``generate`` block (never drop) until there is room, and ``imap`` streams an iterator of any
length through a bounded window.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import tempfile
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, Iterable, Iterator

from mpdp import errors
from mpdp.dispatcher import Dispatcher, Entry, PoolState
from mpdp.engines import GPU_ENGINES, resolve_model
from mpdp.gcpause import gc_paused
from mpdp.requests import Completion, build_request, check_sampling, estimate_cost, prefix_key
from mpdp.scheduler import POLICIES, Scheduler, Ticket
from mpdp.supervisor import LaunchConfig, Supervisor, plan_slots, visible_gpus
from mpdp.transport import Transport

DEFAULT_MODEL = "smollm2-135m-instruct"
_READY_TIMEOUT = {"vllm": 900.0, "hf": 300.0}
_HEARTBEAT_TIMEOUT = {"vllm": 60.0}
_CHUNK = 4096          # requests per command posted by generate(): one wake-up per chunk


class _PoolFuture(Future):
    """A Future whose cancel() also aborts the request inside its engine.

    The pool never marks its futures RUNNING, so cancel() succeeds until the result is set.
    """

    def __init__(self, request_id: int, on_cancel):
        super().__init__()
        self.request_id = request_id
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        if super().cancel():
            self._on_cancel(("cancel", self.request_id))
            return True
        return False


def default_engine() -> str:
    """vLLM where it is installed and a GPU is visible, else transformers on the CPU."""
    if importlib.util.find_spec("vllm") is not None and visible_gpus():
        return "vllm"
    return "hf"


class Pool:
    """A data-parallel pool of engines, one per worker process (per GPU, or per tensor-parallel group).

    ``Pool(model, engine="hf", num_workers=2)`` on CPU; ``Pool(model, engine="vllm", num_gpus=4)``
    on GPUs. Sampling keywords given here (vLLM ``SamplingParams`` names) are defaults that
    each request may override.
    """

    def __init__(self, model: str = DEFAULT_MODEL, engine: str | None = None, num_workers: int | None = None,
                 num_gpus: int | None = None, tensor_parallel_size: int = 1, engine_options: dict | None = None,
                 *, gpus: list[int] | None = None, routing: str = "least_loaded", max_batch: int = 512,
                 max_pending: int = 100_000, max_crashes: int = 2, heartbeat_interval: float = 0.5,
                 heartbeat_timeout: float | None = None, ready_timeout: float | None = None,
                 shutdown_timeout: float = 30.0, transport: str | Transport = "ipc", worker_logs: str = "file",
                 worker_env: dict[str, str] | None = None, wait_ready: bool = True, **sampling_defaults):
        engine = engine or default_engine()
        options = dict(engine_options or {})
        self.defaults = check_sampling(sampling_defaults)
        self.engine, self.max_pending = engine, int(max_pending)
        if self.max_pending < 1 or max_crashes < 1:
            raise ValueError("max_pending and max_crashes must be >= 1")
        if routing not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, not {routing!r}")
        if worker_logs not in ("file", "inherit"):
            raise ValueError("worker_logs must be 'file' (kept for error reports) or 'inherit'")
        slots = self._plan(engine, num_workers, num_gpus, tensor_parallel_size, gpus, options)
        self.model = resolve_model(engine, model, options)
        self.num_workers = len(slots)
        transport = transport if isinstance(transport, Transport) else Transport(kind=transport)
        log_dir = tempfile.mkdtemp(prefix="mpdp-logs-") if worker_logs == "file" else None
        launch = LaunchConfig(engine, self.model, options, heartbeat_interval, log_dir, dict(worker_env or {}))
        self._dispatcher = d = Dispatcher(
            lambda endpoint: Supervisor(slots, launch, endpoint, transport.curve), transport,
            Scheduler(POLICIES[routing](), max_batch=max_batch),
            heartbeat_timeout=heartbeat_timeout or _HEARTBEAT_TIMEOUT.get(engine, 10.0),
            ready_timeout=ready_timeout or _READY_TIMEOUT.get(engine, 60.0),
            max_crashes=max_crashes, shutdown_timeout=shutdown_timeout)
        # Runs on close(), garbage collection or interpreter exit; holds no reference to the pool.
        self._finalizer = weakref.finalize(self, _shutdown, d, False, 10.0, log_dir)
        if wait_ready:
            try:
                d.ready.wait()
            except BaseException:          # Ctrl-C while engines load
                self._finalizer()
                raise
            if d.start_error is not None:
                self._finalizer()
                raise d.start_error

    @staticmethod
    def _plan(engine, num_workers, num_gpus, tp, gpus, options):
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if engine not in GPU_ENGINES:
            if num_gpus or gpus:
                raise ValueError(f"the {engine!r} engine runs on CPU: give num_workers, not num_gpus/gpus")
            return plan_slots(num_workers or min(4, os.cpu_count() or 1), None, 1)
        visible = visible_gpus()
        if gpus is not None:
            try:
                chosen = [visible[i] for i in gpus]
            except (IndexError, TypeError):
                raise ValueError(f"gpus={gpus!r} must index the {len(visible)} visible GPUs") from None
        else:
            chosen = visible[:num_gpus] if num_gpus else visible
        if num_gpus and len(chosen) < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but only {len(visible)} GPUs are visible")
        if not chosen:
            raise ValueError("no GPU is visible: use engine='hf' on CPU, or set CUDA_VISIBLE_DEVICES")
        if len(chosen) % tp:
            raise ValueError(f"{len(chosen)} GPUs do not split into groups of tensor_parallel_size={tp}")
        options.setdefault("tensor_parallel_size", tp)
        return plan_slots(num_workers or len(chosen) // tp, chosen, tp)

    # -- submitting ---------------------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, timeout: float | None = None,
               **sampling) -> Future:
        """One request; returns a Future of a ``Completion``. Bad input raises here, at once."""
        params = self._params(sampling)
        return self._post([self._entry(prompt, messages, prompt_token_ids, params, timeout)])[0]

    def generate(self, items: Iterable[Any], *, timeout: float | None = None,
                 return_exceptions: bool = False, **sampling) -> list[Completion]:
        """Many requests; results in input order. Items: a prompt string, a messages list, or a dict
        with ``prompt``/``messages``/``prompt_token_ids`` and per-item sampling overrides."""
        futures = self._submit_items(items, timeout, sampling)
        return [_outcome(f, return_exceptions) for f in futures]

    async def agenerate(self, items: Iterable[Any], *, timeout: float | None = None,
                        return_exceptions: bool = False, **sampling) -> list[Completion]:
        futures = self._submit_items(items, timeout, sampling)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures),
                                    return_exceptions=return_exceptions)

    async def asubmit(self, prompt: str | None = None, **kwargs) -> Completion:
        return await asyncio.wrap_future(self.submit(prompt, **kwargs))

    def imap(self, items: Iterable[Any], *, window: int | None = None, timeout: float | None = None,
             return_exceptions: bool = False, **sampling) -> Iterator[Completion]:
        """Stream results in input order over an iterator of any length, at most ``window`` in flight."""
        window = window or min(self.max_pending, 8192)
        params = self._params(sampling)
        in_flight: deque[Future] = deque()
        for item in items:
            try:
                future = self._post([self._item_entry(item, params, timeout)])[0]
            except (ValueError, TypeError) as exc:
                if not return_exceptions:
                    raise
                future = Future()               # a bad item fails alone, in its place
                future.set_exception(exc)
            in_flight.append(future)
            if len(in_flight) >= window:
                yield _outcome(in_flight.popleft(), return_exceptions)
        while in_flight:
            yield _outcome(in_flight.popleft(), return_exceptions)

    def _submit_items(self, items, timeout, sampling) -> list[Future]:
        """Validate and post in chunks, so the workers start on the first chunk while later
        ones are still being built. Every item is checked before anything is posted only when
        ``items`` fits one chunk; a bad item further on raises after the earlier chunks went out
        (their futures are cancelled, so nothing is left running)."""
        params = self._params(sampling)
        futures: list[Future] = []
        items = iter(items)
        size = min(_CHUNK, self.max_pending)       # a bigger chunk than max_pending never finds room
        try:
            while True:
                with gc_paused():
                    chunk = [self._item_entry(item, params, timeout) for item in itertools.islice(items, size)]
                if not chunk:
                    return futures
                futures.extend(self._post(chunk))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

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
        if not sampling:
            return base if base is not None else self.defaults
        merged = dict(self.defaults if base is None else base)
        merged.update(check_sampling(sampling))
        return merged

    def _entry(self, prompt, messages, ids, params, timeout) -> Entry:
        request = build_request(0, prompt, messages, ids, params)   # the id is given in _post
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        d = self._dispatcher
        return Entry(request, _PoolFuture(request.id, d.post),
                     Ticket(request.id, estimate_cost(request), prefix_key(request)),
                     time.monotonic() + timeout if timeout else None)

    def _post(self, entries: list[Entry]) -> list[Future]:
        d = self._dispatcher
        self._wait_for_room(len(entries))
        with d.state_lock:
            if d.state not in (PoolState.RUNNING, PoolState.STARTING):
                raise errors.PoolClosed(f"the pool is {d.state.value}; no new requests")
            for e in entries:     # unique ids under the lock, whatever threads raced in _entry
                d.last_id += 1
                e.request.id = e.ticket.id = e.future.request_id = d.last_id
            d.submitted += len(entries)
            d.post(("submit", entries))
        return [e.future for e in entries]

    def _wait_for_room(self, n: int) -> None:
        d = self._dispatcher
        if d.submitted - d.completed + n <= self.max_pending:
            return
        with d.space:
            d.space_waiters += 1
            try:
                while d.submitted - d.completed + n > self.max_pending and d.state == PoolState.RUNNING:
                    d.space.wait(0.5)
            finally:
                d.space_waiters -= 1

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop the pool. ``wait=True`` finishes pending requests first; ``wait=False`` or
        ``cancel_pending=True`` fails them with PoolClosed and aborts them in the engines."""
        wait = wait and not cancel_pending
        _shutdown(self._dispatcher, wait, timeout, None)
        self._finalizer()         # kills leftovers, removes the log folder; runs once

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception (Ctrl-C included) do not wait for pending work.
        self.close(wait=exc_type is None)

    @property
    def closed(self) -> bool:
        return self._dispatcher.state in (PoolState.CLOSED, PoolState.BROKEN)

    def stats(self) -> dict[str, Any]:
        d = self._dispatcher
        loads = d.scheduler.workers
        workers = []
        for s in d.slots:
            load = loads.get(s.index)
            workers.append({
                "index": s.index, "pid": s.pid, "alive": s.alive, "state": s.state.value,
                "gpus": s.gpus, "capacity": s.capacity, "in_flight": len(load.in_flight) if load else 0,
                "requests": s.requests, "tokens": s.tokens, "prompt_tokens": s.prompt_tokens,
                "restarts": s.restarts, "max_model_len": s.max_model_len,
                "first_dispatch": s.first_dispatch, "last_result": s.last_result,
            })
        return {"state": d.state.value, "engine": self.engine, "model": self.model, "workers": workers,
                "pending": d.num_pending(), "waiting": d.scheduler.num_waiting,
                "submitted": d.submitted, "completed": d.completed, "dropped_frames": d.dropped_frames}


def _outcome(future: Future, return_exceptions: bool):
    if return_exceptions:
        exc = future.exception()
        return exc if exc is not None else future.result()
    return future.result()


def _shutdown(d: Dispatcher, wait: bool, timeout: float | None, log_dir: str | None) -> None:
    if d.begin_close(wait):
        d.post(("close", (wait, "the pool was closed with this request pending")))
    # A future's done-callback runs on the dispatcher thread: waiting there for the dispatcher
    # to stop would wait for itself. It stops once the callback returns.
    if not d.is_dispatcher_thread():
        d.stopped.wait(timeout)
    if log_dir:
        import shutil
        shutil.rmtree(log_dir, ignore_errors=True)
