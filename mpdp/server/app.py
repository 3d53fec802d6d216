"""The routes: ``create_app(pool, ...)`` returns a FastAPI (ASGI) app over a running ``mpdp.Pool``.

One HTTP request's path: the body is parsed into pool calls (``openai_api.request.parse``); the
request waits for room (``admission``: all its prompts' places of the pool's ``max_pending`` at
once, on the event loop, bounded by ``queue_timeout``, never dropped); then ``pool.asubmit`` (or
``pool.astream`` for ``stream: true``) per prompt. Every failure is read once
(``errors.classify``) and answered with OpenAI's status for its kind
(``openai_api.response.STATUS``): a bad value is a 400 naming the field in ``param``. Streams
go out as server-sent events of the engines' own deltas. A client that goes
away cancels its pool futures, which aborts the requests inside their engines: non-streamed
requests race the pool's answer against ``http.disconnect``; streamed ones always listen for it
(``_SSEResponse``), whatever ASGI version the server speaks.

``ServerState.begin_drain()`` (called on SIGTERM by ``lifecycle``) makes ``/health`` answer 503
and new requests 503 while the requests in flight finish; ``end_grace()`` stops those still in
flight when the grace ends, each answered (503 ``shutting_down``, or an error event and ``[DONE]``
in a stream) before the server stops.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from functools import partial
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpdp.openai_api import request as parsing
from mpdp.openai_api import response as shapes
from mpdp.openai_api.response import APIError
from mpdp.server import sse
from mpdp.server.admission import Admission
from mpdp.server.body_limit import BodyLimit
from mpdp.server.metrics import PoolCollector, RequestMetrics

MAX_BODY_BYTES = 32 << 20          # the pool refuses requests over half a wire frame anyway
DEFAULT_QUEUE_TIMEOUT = 600.0


def _json(obj: Any, status: int = 200) -> Response:
    try:
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:      # a lone surrogate the client sent, echoed back: escape it
        data = json.dumps(obj, separators=(",", ":")).encode()
    return Response(data, status, media_type="application/json")


class _ClientGone(Exception):
    """The client disconnected before its answer began."""


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always listens for ``http.disconnect`` and cancels the stream
    when it comes. (Starlette stops listening for servers that speak ASGI 2.4 and notices a
    gone client only at its next write: a request the engine holds without output would then
    stay in the engine until it finished.)"""

    def __init__(self, content, on_close, state: "ServerState", **kwargs):
        super().__init__(content, **kwargs)
        self.on_close, self.state = on_close, state
        self.started = self.ended = False

    async def stream_response(self, send) -> None:
        """Starlette's, noting how far it got (the body is bytes already)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self.started = True
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.ended = True

    async def __call__(self, scope, receive, send) -> None:
        cut = streaming = False

        def cut_short(_) -> None:          # the shutdown grace ended: stop here, say why below
            nonlocal cut
            if streaming:                  # (a callback already scheduled may come after the end)
                cut = True
                group.cancel_scope.cancel()

        cut_off = self.state.cut_off
        try:
            async with anyio.create_task_group() as group:
                async def run_then_cancel(func) -> None:
                    await func()
                    group.cancel_scope.cancel()

                streaming = True
                cut_off.add_done_callback(cut_short)
                group.start_soon(run_then_cancel, partial(self.stream_response, send))
                await run_then_cancel(partial(self.listen_for_disconnect, receive))
            streaming = False
            if cut and not self.ended:
                # An error event then [DONE] (as for any error after the stream began), not a cut stream.
                if not self.started:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                await send({"type": "http.response.body", "more_body": False,
                            "body": sse.event(self.state.shutdown_error().body()) + sse.DONE})
        finally:
            streaming = False
            cut_off.remove_done_callback(cut_short)
            self.on_close()      # also when the body never started (the client left at once)


class _Streams:
    """A streamed request's pool streams and what it holds (room, in-flight count); ``close``
    (idempotent) aborts what has not finished and gives the rest back."""

    def __init__(self, state: "ServerState", streams: list, k: int):
        self.state, self.streams, self.k = state, streams, k
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.streams:
            if not s.future.done():
                s.cancel()                 # aborts it in its engine
        self.state.admission.give(self.k)
        self.state.end()


class ServerState:
    """What the routes share: the pool, names, key, metrics, admission, and the drain."""

    def __init__(self, pool, served: list[str], api_key: str | None, request_timeout: float | None,
                 queue_timeout: float | None, registry: CollectorRegistry):
        self.pool = pool
        self.served = served
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.defaults = endpoint_defaults(pool)
        self.admission = Admission(pool.max_pending, queue_timeout)
        self.registry = registry
        self.metrics = RequestMetrics(registry)
        registry.register(PoolCollector(pool, lambda: self.admission.waiting))
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._cut_off: asyncio.Future | None = None

    # -- the drain -----------------------------------------------------------------------------
    def begin(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; no new requests", "service_unavailable_error",
                           None, "shutting_down")
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def cut_off(self) -> asyncio.Future:
        """Done when the grace ends: what is still in flight then stops with ``shutdown_error``."""
        if self._cut_off is None:              # made in the serving loop, not at import
            self._cut_off = asyncio.get_running_loop().create_future()
        return self._cut_off

    def end_grace(self) -> None:
        """Stop every request in flight now, each with an answer (a 503, or in a stream an error
        event and ``[DONE]``), before the server stops: cancelled by uvicorn instead, they got a
        plain-text 500 or a cut stream, and a traceback each in the log."""
        self.admission.close(self.shutdown_error)
        if not self.cut_off.done():
            self.cut_off.set_result(None)

    @staticmethod
    def shutdown_error() -> APIError:
        return APIError(503, "the server shut down before this request finished (its shutdown grace ended)",
                        "service_unavailable_error", None, "shutting_down")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout`` passed (False)."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- checks ---------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key")


def create_app(pool, served_model_names: list[str] | str | None = None, *, api_key: str | None = None,
               request_timeout: float | None = None, queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
               registry: CollectorRegistry | None = None) -> FastAPI:
    """An OpenAI-compatible ASGI app over ``pool`` (which the caller keeps and closes).

    ``served_model_names``: the names clients put in ``model`` (default: the pool's model as
    given). ``api_key``: required as ``Authorization: Bearer`` on ``/v1/*`` (``/health`` and
    ``/metrics`` stay open, as in vLLM). ``request_timeout``: each pool request's ``timeout``.
    ``queue_timeout``: how long a request may wait for room in a full pool (then 503).
    ``registry``: where the metrics go (default: a registry of this app's own).
    """
    if isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    served = list(served_model_names or [pool.config.model])
    state = ServerState(pool, served, api_key, request_timeout, queue_timeout, registry or CollectorRegistry())
    app = FastAPI(title="mpdp", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mpdp = state
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)     # a chunked upload is cut off at the limit

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _json(exc.body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json(shapes.error_body(str(exc.detail), kind, None, None), exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return _json(shapes.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    @app.get("/health")
    async def health():
        status, body = await asyncio.to_thread(_health, state)
        return _json(body, status)

    @app.get("/metrics")
    async def metrics():
        text = await asyncio.to_thread(generate_latest, state.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_key(request)
        stats = await asyncio.to_thread(pool.stats)
        lens = [w["max_model_len"] for w in stats.get("workers", []) if w.get("max_model_len")]
        return _json(shapes.models_body(served, pool.config.model, min(lens) if lens else None))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _handle(request, state, parsing.CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, state, parsing.COMPLETION)

    return app


def _health(state: ServerState) -> tuple[int, dict]:
    stats = state.pool.stats()
    workers = [{"index": w["index"], "state": w["state"], "pid": w.get("pid"), "restarts": w.get("restarts", 0),
                "in_flight": w.get("in_flight", 0)} for w in stats.get("workers", [])]
    pool_state = stats.get("state", state.pool.state)
    if state.draining or pool_state == "draining":
        status = "draining"
    elif pool_state in ("broken", "closed"):
        status = pool_state
    elif pool_state == "starting":
        status = "starting"
    elif workers and all(w["state"] == "ready" for w in workers):
        status = "ready"
    else:
        status = "degraded"                # a worker is restarting: not every worker serves
    return (200 if status == "ready" else 503), {"status": status, "pool": pool_state, "workers": workers}


async def _body(request: Request) -> Any:
    raw = await request.body()         # BodyLimit raises 413 as the body passes MAX_BODY_BYTES
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


def _failure_kind(err: APIError) -> str:
    if err.code == "context_length_exceeded":
        return "context_length"
    if err.status == 503:
        return "unavailable"
    if err.status == 504:
        return "timeout"
    return "bad_request" if err.status < 500 else "server_error"


async def _handle(request: Request, state: ServerState, kind: str) -> Response:
    arrived = time.monotonic()
    state.check_key(request)
    p = None
    try:
        p = parsing.parse(await _body(request), kind, state.served)
        state.begin()
    except Exception as exc:
        err = shapes.api_error(exc)
        state.metrics.observe_failure(_failure_kind(err))
        raise err from None
    ended = False
    try:
        k = len(p.inputs)
        await state.admission.take(k)
        try:
            queued = time.monotonic() - arrived     # observed once the pool took the request
            if p.stream:
                held = _Streams(state, [sse.Started(s) for s in await _open_streams(state, p)], k)
                ended = True           # from here held.close() (the response's, or below) lets go
                try:
                    await _started(request, state, held)
                except BaseException:
                    held.close()
                    raise
                state.metrics.observe_queue(queued)
                return _SSEResponse(_events(state, p, held, arrived), held.close, state,
                                    media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _answer(request, state, p, arrived, queued)
        finally:
            if not ended:
                state.admission.give(k)
    except APIError as err:
        state.metrics.observe_failure(_failure_kind(err))
        raise
    except _ClientGone:
        # Its pool requests are aborted; nobody reads an answer (raised, it logged a traceback).
        state.metrics.observe_failure("aborted")
        return Response(status_code=499)
    except (asyncio.CancelledError, GeneratorExit):
        state.metrics.observe_failure("aborted")
        raise
    except Exception as exc:
        err = shapes.api_error(exc, p)
        state.metrics.observe_failure(_failure_kind(err))
        raise err from exc
    finally:
        if not ended:
            state.end()


def endpoint_defaults(pool) -> dict[str, dict]:
    """Each endpoint's sampling defaults (``mpdp.defaults``, the ``serve_*`` rows), less what the
    pool sets itself (``--max-tokens`` and the like, or a pool of the caller's own): chat without
    max_tokens generates up to the context, as OpenAI's API and ``vllm serve`` do."""
    from mpdp.defaults import sampling_defaults

    own = getattr(pool, "defaults", None) or {}
    return {kind: {k: v for k, v in sampling_defaults(door).items() if k not in own}
            for kind, door in ((parsing.CHAT, "serve_chat"), (parsing.COMPLETION, "serve_completions"))}


def _calls(state: ServerState, p: parsing.Parsed) -> list[dict]:
    """The request's pool calls, with the endpoint's defaults under what the request gives."""
    defaults = state.defaults[p.kind]
    return [{**defaults, **call} for call in p.pool_calls()] if defaults else p.pool_calls()


async def _open_streams(state: ServerState, p: parsing.Parsed) -> list:
    streams = []
    try:
        for call in _calls(state, p):
            streams.append(await state.pool.astream(**call, timeout=state.request_timeout))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return streams


async def _started(request: Request, state: ServerState, held: _Streams) -> None:
    """Wait for each stream's first delta before the response begins: a request its engine refuses
    when it takes it (a prompt over the context) then gets its own status (400), as unstreamed and
    as in vLLM, not a 200 whose body is an error event. The client leaving meanwhile aborts it."""
    await _unless_gone(request, state, [s.start() for s in held.streams])


async def _unless_gone(request: Request, state: ServerState, calls: list) -> list:
    """The results of ``calls`` (coroutines), run together, unless the client leaves first
    (``_ClientGone``) or the server shuts down; then, or when one fails, every one is cancelled
    (cancelling a task that awaits a pool future aborts that request)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    together = tasks[0] if len(tasks) == 1 else asyncio.gather(*tasks)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((together, gone, state.cut_off), return_when=asyncio.FIRST_COMPLETED)
        if together not in done:
            if gone not in done:
                raise state.shutdown_error()
            raise _ClientGone()
        return [together.result()] if len(tasks) == 1 else together.result()
    except BaseException:
        for t in tasks:                # gather does not cancel the others when one fails
            t.cancel()
        if not together.done():
            together.cancel()
        raise
    finally:
        gone.cancel()


async def _answer(request: Request, state: ServerState, p: parsing.Parsed, arrived: float,
                  queued: float) -> Response:
    """A non-streamed request: the pool's answers, unless the client leaves first (then abort)."""
    completions = await _unless_gone(request, state, [state.pool.asubmit(**call, timeout=state.request_timeout)
                                                      for call in _calls(state, p)])
    seconds = time.monotonic() - arrived
    state.metrics.observe_queue(queued)
    for c in completions:
        state.metrics.observe_done(c, seconds)
    return _json(shapes.response(p, shapes.new_id(p.kind), int(time.time()), completions))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _events(state: ServerState, p: parsing.Parsed, held: _Streams, arrived: float):
    """The SSE body: a role chunk per choice (chat), the engines' deltas as they come (those that
    waited for a busy server joined into one chunk), the finish reason with the last text, a
    usage chunk when asked (and usage so far on every chunk with ``continuous_usage_stats``, as
    vLLM's server does), ``[DONE]``. An error after the stream began is one
    ``data: {"error": ...}`` event (as vLLM sends it), then ``[DONE]``."""
    rid, created, n, streams = shapes.new_id(p.kind), int(time.time()), p.n, held.streams
    texts = sse.TextEvents(p, rid, created)
    first: float | None = None
    completions: list = [None] * len(streams)
    try:
        if p.kind == parsing.CHAT:
            nothing_yet = shapes.running_usage(0, 0) if p.continuous_usage else None
            for j in range(n):
                yield sse.event(shapes.chunk(p, rid, created, j, "", role=True, usage=nothing_yet))
        async for i, new, finished, last in sse.batches(streams):
            if first is None and any(new):
                first = time.monotonic()
            if finished:
                c = completions[i] = await _completion(streams[i].future)
                so_far = shapes.running_usage(c.prompt_tokens, c.completion_tokens) if p.continuous_usage else None
                for j, text in enumerate(new):
                    reason = shapes.finish_reason(c.finish_reasons[j] if j < len(c.finish_reasons) else "")
                    yield sse.event(shapes.chunk(p, rid, created, i * n + j, text, reason,
                                                 shapes.choice_logprobs(p, c, j), usage=so_far))
                continue
            if p.continuous_usage:
                so_far = shapes.running_usage(last.prompt_tokens, last.completion_tokens)
                for j, text in enumerate(new):
                    if text:
                        yield sse.event(shapes.chunk(p, rid, created, i * n + j, text, usage=so_far))
                continue
            for j, text in enumerate(new):
                if text:
                    yield texts.text(i * n + j, text)
        if p.include_usage:
            yield sse.event(shapes.usage_chunk(p, rid, created, completions))
        yield sse.DONE
        now = time.monotonic()
        for c in completions:
            state.metrics.observe_done(c, now - arrived, None if first is None else first - arrived)
    except (asyncio.CancelledError, GeneratorExit, anyio.get_cancelled_exc_class()):
        state.metrics.observe_failure("aborted")       # the client left: the streams abort below
        raise
    except Exception as exc:
        err = shapes.api_error(exc, p)
        state.metrics.observe_failure(_failure_kind(err))
        yield sse.event(err.body())
        yield sse.DONE
    finally:
        held.close()


async def _completion(future):
    """A finished stream's Completion. Its future resolves just after the final delta is handed
    over (so that a stream never ends without it): usually done by the time the event loop reads
    that delta, and then read at once, without wrap_future's hop through the event loop."""
    if future.done():
        return future.result()
    return await asyncio.wrap_future(future)
