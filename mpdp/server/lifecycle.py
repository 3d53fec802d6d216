"""Running the app under uvicorn, and stopping it cleanly.

SIGTERM or SIGINT starts a drain: ``/health`` answers 503 and new requests 503 (the port stays
open, so a load balancer sees the drain instead of refused connections), the requests in flight
finish, for at most ``grace`` seconds; then what is left is stopped (aborted in its engine) and
answered 503 ``shutting_down`` (a stream: an error event, then ``[DONE]``), uvicorn stops, and a
pool the server owns is closed. A second signal skips the rest of the grace. uvicorn's own handlers are replaced, not chained: they would re-raise the
signal after the server stopped and turn a clean stop into death by SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading

import uvicorn

from mpdp.server.app import create_app
from mpdp.server.bind import check_bind

FINAL_FLUSH_S = 1.0          # after the grace: time for answers already made to reach their clients


def _say(message: str) -> None:
    print(f"mpdp serve: {message}", file=sys.stderr, flush=True)


def _stack(config: uvicorn.Config) -> str:
    """The event loop and HTTP parser serving, e.g. "uvloop, httptools" (they decide the cost of a
    streamed token; a benchmark log should show which ones ran)."""
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    http = config.http_protocol_class.__module__.rsplit(".", 1)[-1].removesuffix("_impl")
    return f"{loop}, {http}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, grace: float, pool=None, owns_pool: bool = False):
        super().__init__(config)
        self.state, self.grace, self.pool, self.owns_pool = state, grace, pool, owns_pool
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._skip_grace: asyncio.Event | None = None
        self._watch_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield                          # only the main thread may handle signals
            return
        self._loop = asyncio.get_running_loop()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        # A signal handler runs between two bytecodes of the loop's thread: only schedule.
        self._loop.call_soon_threadsafe(self.stop, signal.Signals(signum).name)

    def stop(self, why: str = "stop") -> None:
        """Drain, then exit (from the loop's thread); a second call ends the grace at once."""
        if self._drain_task is None:
            self._skip_grace = asyncio.Event()
            self._drain_task = asyncio.ensure_future(self._drain(why))
        else:
            _say(f"{why} again: cancelling the requests in flight now")
            self._skip_grace.set()

    async def _drain(self, why: str) -> None:
        self.state.begin_drain()
        if self.state.in_flight:
            _say(f"{why}: draining {self.state.in_flight} requests in flight (up to {self.grace:g}s)")
        else:
            _say(f"{why}: stopping")
        idle = asyncio.ensure_future(self.state.wait_idle(self.grace))
        skip = asyncio.ensure_future(self._skip_grace.wait())
        await asyncio.wait((idle, skip), return_when=asyncio.FIRST_COMPLETED)
        skipped = skip.done()
        idle.cancel()
        skip.cancel()
        if self.state.in_flight:
            if not skipped:
                _say(f"grace of {self.grace:g}s passed: cancelling {self.state.in_flight} requests")
            # Answered by the app (503, or an error event in a stream) while the server still runs.
            self.state.end_grace()
            if not await self.state.wait_idle(FINAL_FLUSH_S):
                _say(f"{self.state.in_flight} requests did not stop within {FINAL_FLUSH_S:g}s")
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit:               # could not bind
            self.exit_code = 1
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        _say(f"listening on http://{where}:{port} ({_stack(self.config)})")
        if self.owns_pool:
            self._watch_task = asyncio.ensure_future(self._watch_start())

    async def _watch_start(self) -> None:
        """Say when the workers are ready; stop with exit code 1 if they never can be."""
        while self.pool.state == "starting":
            await asyncio.sleep(0.1)
        if self.pool.state in ("broken", "closed"):
            error = self.pool.start_error
            _say(f"error: the workers did not start: {error or self.pool.state}")
            self.exit_code = 1
            self.should_exit = True
        else:
            _say(f"{self.pool.num_workers} {self.pool.engine} workers ready")

    async def shutdown(self, sockets=None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        await super().shutdown(sockets)
        if self.owns_pool:
            # Everything the server sent is finished or cancelled: nothing waits on the pool.
            await asyncio.to_thread(self.pool.close, False)


def serve(pool, host: str = "127.0.0.1", port: int = 8000, *, served_model_names=None, api_key: str | None = None,
          allow_unauthenticated: bool = False, grace: float = 30.0, close_pool: bool = False,
          log_level: str = "info", access_log: bool = False, **app_options) -> int:
    """Serve ``pool`` over HTTP until SIGTERM/SIGINT; returns the exit code (0 after a clean stop).
    A ``host`` other than loopback needs ``api_key`` or ``allow_unauthenticated=True`` (ValueError
    before binding, as ``mpdp serve`` refuses it). ``close_pool``: close the pool when the server
    stops (the command line does). Other keywords go to ``create_app``."""
    notice = check_bind(host, api_key, allow_unauthenticated)
    if notice:
        _say(notice)
    app = create_app(pool, served_model_names, api_key=api_key, **app_options)
    # "auto": uvloop and httptools where installed (as vllm serve gets them), else asyncio and h11.
    # Server.run() applies the loop choice; asyncio.run(server.serve()) would always use asyncio's.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="off", timeout_graceful_shutdown=FINAL_FLUSH_S, loop="auto", http="auto")
    server = _Server(config, app.state.mpdp, grace, pool, close_pool)
    try:
        server.run()
    finally:
        if close_pool and not pool.closed:
            pool.close(wait=False)
    return server.exit_code
