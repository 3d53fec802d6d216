"""Prometheus metrics, named as vLLM's (``vllm:`` becomes ``mpdp:``), with a ``worker`` label where
a figure belongs to one worker.

Two parts, both usable without the server::

    from prometheus_client import REGISTRY
    REGISTRY.register(PoolCollector(pool))        # read from pool.stats() at each scrape
    requests = RequestMetrics(REGISTRY)           # per-request figures: call observe_*()

``PoolCollector`` reports what the pool itself counts, so it covers every caller of the pool,
not only HTTP ones: requests running per worker and waiting, prompt and generation tokens per
worker, worker restarts and worker up, prefix-cache reuse per worker (as the engine reported it)
and how often the cache-aware router predicted it, each worker's batch limit and its reason, and
whether the callers leave the engines underfilled. ``RequestMetrics`` holds what only the caller sees:
success by finish reason, failures by kind, end-to-end latency, queue time (arrival until the
pool took the request: time spent waiting for room, the backpressure) and time to first token
(streamed requests: the engines say nothing to the caller before the end of the others).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets, with finer ones below 0.3 s for CPU engines and short answers.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class PoolCollector:
    """A custom collector over ``pool.stats()``; ``extra_waiting`` adds requests waiting outside
    the pool (the server's own admission queue) to ``mpdp:num_requests_waiting``."""

    def __init__(self, pool, extra_waiting: Callable[[], int] | None = None):
        self.pool = pool
        self.extra_waiting = extra_waiting

    def describe(self):
        # Present so that registering does not call collect() (which asks the dispatcher).
        return []

    def collect(self):
        stats = self.pool.stats()
        workers = stats.get("workers", [])
        running = GaugeMetricFamily("mpdp:num_requests_running", "Requests in flight on each worker's engine.",
                                    labels=["worker"])
        prompt = CounterMetricFamily("mpdp:prompt_tokens", "Prompt tokens of the requests each worker finished.",
                                     labels=["worker"])
        generation = CounterMetricFamily("mpdp:generation_tokens",
                                         "Generated tokens of the requests each worker finished.", labels=["worker"])
        finished = CounterMetricFamily("mpdp:worker_requests", "Requests each worker finished (or failed).",
                                       labels=["worker"])
        restarts = CounterMetricFamily("mpdp:worker_restarts", "Restarts of each worker after a death.",
                                       labels=["worker"])
        up = GaugeMetricFamily("mpdp:worker_up", "1 while the worker is ready, else 0.", labels=["worker"])
        # Prefix-cache reuse, in tokens, as vLLM's own counters (engines that report it: vLLM).
        queries = CounterMetricFamily("mpdp:prefix_cache_queries", "Prompt tokens of the finished requests "
                                      "whose engine reported its prefix-cache reuse.", labels=["worker"])
        hits = CounterMetricFamily("mpdp:prefix_cache_hits", "Of those, the tokens found in the prefix cache.",
                                   labels=["worker"])
        hit_rate = GaugeMetricFamily("mpdp:prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries "
                                     "since the pool started.", labels=["worker"])
        predicted = CounterMetricFamily("mpdp:routing_prefix_predictions", "Requests whose cached tokens the "
                                        "cache-aware router predicted, by the source of the prediction (exact: "
                                        "the engine's KV events; mirror: its own guess).", labels=["worker", "source"])
        predicted_ok = CounterMetricFamily("mpdp:routing_prefix_predictions_within_block", "Of those, the ones "
                                           "within one KV block of what the engine reported.",
                                           labels=["worker", "source"])
        # The batch limit (core/batch_limits.py): requests each engine may hold, and why.
        limit = GaugeMetricFamily("mpdp:batch_limit", "Requests each worker's engine may hold now (its credit).",
                                  labels=["worker"])
        limit_reason = GaugeMetricFamily("mpdp:batch_limit_reason", "1 for the reason of each worker's batch "
                                         "limit (probing, settled at knee, light load, fixed, off, starting).",
                                         labels=["worker", "reason"])
        for w in workers:
            label = [str(w["index"])]
            running.add_metric(label, w.get("in_flight", 0))
            prompt.add_metric(label, w.get("prompt_tokens", 0))
            generation.add_metric(label, w.get("tokens", 0))
            finished.add_metric(label, w.get("requests", 0))
            restarts.add_metric(label, w.get("restarts", 0))
            up.add_metric(label, 1 if w.get("state") == "ready" else 0)
            if w.get("cached_tokens") is not None:
                queries.add_metric(label, w.get("prompt_tokens", 0))
                hits.add_metric(label, w["cached_tokens"])
                if w.get("prefix_hit_rate") is not None:
                    hit_rate.add_metric(label, w["prefix_hit_rate"])
            if w.get("batch_limit") is not None:
                limit.add_metric(label, w["batch_limit"])
                limit_reason.add_metric(label + [w.get("batch_limit_reason", "")], 1)
            for source in ("exact", "mirror"):
                if f"predicted_{source}" in w:
                    predicted.add_metric(label + [source], w[f"predicted_{source}"])
                    predicted_ok.add_metric(label + [source], w[f"predicted_{source}_within_block"])
        extra = self.extra_waiting() if self.extra_waiting else 0
        yield running
        yield GaugeMetricFamily("mpdp:num_requests_waiting", "Requests waiting for a worker (and for room).",
                                value=stats.get("waiting", 0) + extra)
        yield GaugeMetricFamily("mpdp:num_requests_pending", "Requests the pool holds (waiting or running).",
                                value=stats.get("pending", 0))
        yield prompt
        yield generation
        yield finished
        yield restarts
        yield up
        yield from (queries, hits, hit_rate, predicted, predicted_ok)
        yield from (limit, limit_reason)
        # Said once (and logged) when the callers keep too few requests in flight to fill the engines.
        under = stats.get("underfill") or {}
        yield GaugeMetricFamily("mpdp:pool_underfilled", "1 once the callers were seen keeping the engines "
                                "mostly empty (nothing waiting, under a quarter of their credit in flight); "
                                "send more at once: more threads, or generate/agenerate.", value=1 if under else 0)
        if under:
            yield GaugeMetricFamily("mpdp:pool_underfill_in_flight", "Requests the callers kept in flight then "
                                    "(mean).", value=under["mean_in_flight"])
            yield GaugeMetricFamily("mpdp:pool_underfill_fill", "Requests in flight that would fill the engines.",
                                    value=under["fill"])


class RequestMetrics:
    """The per-request metrics, registered in ``registry`` (a fresh one per app by default, so
    that several apps in one process do not collide)."""

    def __init__(self, registry: CollectorRegistry):
        self.success = Counter("mpdp:request_success", "Finished requests by the finish reason of their "
                               "first choice.", ["finished_reason", "worker"], registry=registry)
        self.failure = Counter("mpdp:request_failure", "Requests that failed, by kind (bad_request, "
                               "context_length, unavailable, timeout, server_error, aborted).",
                               ["reason"], registry=registry)
        self.e2e = Histogram("mpdp:e2e_request_latency_seconds", "Arrival to the last byte of the answer.",
                             ["worker"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("mpdp:request_queue_time_seconds", "Arrival until the pool took the request "
                               "(waiting for room).", buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("mpdp:time_to_first_token_seconds", "Arrival to the first streamed text.",
                              ["worker"], buckets=TTFT_BUCKETS, registry=registry)

    def observe_queue(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def observe_done(self, completion, seconds: float, ttft: float | None = None) -> None:
        worker = str(completion.worker)
        self.success.labels(completion.finish_reason or "stop", worker).inc()
        self.e2e.labels(worker).observe(seconds)
        if ttft is not None:
            self.ttft.labels(worker).observe(ttft)

    def observe_failure(self, reason: str) -> None:
        self.failure.labels(reason).inc()
