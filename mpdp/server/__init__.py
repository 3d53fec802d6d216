"""``mpdp serve``: an OpenAI-compatible HTTP server over a pool (FastAPI + uvicorn + prometheus_client).

    from mpdp.server import create_app, serve
    app = create_app(pool, served_model_names=["my-model"], api_key="...")   # an ASGI app to mount
    serve(pool, host="127.0.0.1", port=8000)                                 # or run it here

The parts: ``app`` (the routes, over ``mpdp.openai_api``: request bodies to pool calls, results
to OpenAI's response and chunk shapes, the error body), ``admission`` (room in the pool for a
request's prompts, all at once), ``body_limit`` (the body size limit, counted while reading),
``metrics`` (the Prometheus collector over ``pool.stats()`` and the request histograms),
``bind`` (who may reach the server), ``lifecycle`` (uvicorn, drain on SIGTERM/SIGINT), ``cli``
(the subcommand). This module imports nothing heavy: the command line lists the
subcommand from it, and ``mpdp`` exports ``serve``/``create_app`` lazily from here.
"""

from __future__ import annotations

__all__ = ["create_app", "serve", "PoolCollector", "RequestMetrics"]


def __getattr__(name):
    if name == "create_app":
        from mpdp.server.app import create_app
        return create_app
    if name == "serve":
        from mpdp.server.lifecycle import serve
        return serve
    if name in ("PoolCollector", "RequestMetrics"):
        from mpdp.server import metrics
        return getattr(metrics, name)
    raise AttributeError(f"module 'mpdp.server' has no attribute {name!r}")
