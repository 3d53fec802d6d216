"""``mpdp serve``: the whole pool as one OpenAI-compatible endpoint.

Its top level imports nothing heavy (``mpdp --help`` imports every subcommand module).
"""

from __future__ import annotations

import argparse
import os
import sys

from mpdp.cli_args import add_pool_arguments, add_sampling_arguments, seconds as _seconds
from mpdp.server.bind import check_bind

HELP = "serve a pool over an OpenAI-compatible HTTP API (chat, completions, streaming, /metrics)"
EPILOG = """\
endpoints:
  POST /v1/chat/completions, POST /v1/completions, GET /v1/models   (need the API key when one is set)
  GET /health (200 once every worker is ready; 503 while starting, restarting, broken or draining)
  GET /metrics (Prometheus; vLLM's names with an mpdp: prefix)

security: binds 127.0.0.1 unless --host says otherwise; any other address needs --api-key
(or MPDP_API_KEY in the environment) or an explicit --allow-unauthenticated.

stopping: SIGTERM/SIGINT drain (health and new requests answer 503) for up to --shutdown-grace
seconds, then cancel what is left, stop every worker and exit 0; a second signal cancels at once.
exit codes: 0 a clean stop, 1 the workers did not start, 2 a usage mistake.
"""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 picks a free one), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pool_arguments(p)                  # every PoolConfig field, as mpdp generate has them
    # defaults: mpdp.defaults, a row per endpoint (the app fills in each one's own)
    add_sampling_arguments(p, {"chat": "serve_chat", "completions": "serve_completions"})

    http = p.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    http.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s; 0: a free one)")
    http.add_argument("--api-key", default=os.environ.get("MPDP_API_KEY"), metavar="KEY",
                      help="require 'Authorization: Bearer KEY' on /v1/* (default: $MPDP_API_KEY)")
    http.add_argument("--allow-unauthenticated", action="store_true",
                      help="allow binding a non-loopback address without an API key")
    http.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                      help="the model name(s) clients send (default: --model as given)")
    http.add_argument("--request-timeout", type=_seconds, default=None, metavar="SECONDS",
                      help="fail (504) and abort a request running longer (default: none)")
    http.add_argument("--queue-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                      help="how long a request may wait for room in a full pool, then 503 (default: %(default)s)")
    http.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                      help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: %(default)s)")
    http.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                      help="uvicorn's log level (default: %(default)s)")
    http.add_argument("--access-log", action="store_true", help="log every HTTP request")


def _say(message: str) -> None:
    print(f"mpdp serve: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    try:
        check_bind(args.host, args.api_key, args.allow_unauthenticated)   # refused before any worker starts
    except ValueError as exc:
        print(f"mpdp serve: error: {exc}", file=sys.stderr)
        return 2
    if args.shutdown_grace < 0:
        print("mpdp serve: error: --shutdown-grace must be >= 0", file=sys.stderr)
        return 2

    from mpdp import errors
    from mpdp.cli_args import pool_config
    from mpdp.pool import Pool
    from mpdp.server.lifecycle import serve

    try:
        # wait_ready=False: the HTTP server is up (and /health says "starting") while engines load.
        config = pool_config(args, wait_ready=False)
    except (ValueError, TypeError) as exc:      # found in this process: no worker was started
        print(f"mpdp serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        pool = Pool(config=config)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"mpdp serve: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, TypeError)) else 1
    except errors.MpdpError as exc:
        print(f"mpdp serve: error: the workers did not start: {exc}", file=sys.stderr)
        return 1
    _say(f"starting {pool.num_workers} {pool.engine} workers ({args.model})")
    try:
        return serve(pool, args.host, args.port, served_model_names=args.served_model_name or [args.model],
                     api_key=args.api_key, grace=args.shutdown_grace, close_pool=True, log_level=args.log_level,
                     access_log=args.access_log, allow_unauthenticated=args.allow_unauthenticated,
                     request_timeout=args.request_timeout,
                     queue_timeout=args.queue_timeout)
    except SystemExit as exc:                  # uvicorn could not bind the port
        pool.close(wait=False)
        return exc.code if isinstance(exc.code, int) else 1
