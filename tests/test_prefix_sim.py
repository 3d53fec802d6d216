"""bench/prefix_sim.py: the simulated pool runs the real policies and is deterministic; behaviour,
not timings (its seconds are simulated)."""

from __future__ import annotations

import argparse

from bench.prefix_sim import run_one
from bench.prefix_sim_engine import EngineModel

ARGS = argparse.Namespace(scale=0.25, docs=64, questions=8, doc_tokens=3000, random_tokens=1000, workers=2,
                          threads=32, max_tokens=8)
# A quarter-size pool, so that the quarter-size documents outgrow one cache as the full ones do.
MODEL = EngineModel(cache_tokens=36_400)


def test_cache_aware_beats_least_loaded_on_docqa_and_every_request_is_served():
    ll = run_one("docqa", "least_loaded", ARGS, MODEL)
    ca = run_one("docqa", "cache_aware", ARGS, MODEL)
    assert ll["requests"] == ca["requests"] == 128
    assert ca["requests_per_s"] > 1.2 * ll["requests_per_s"]
    hits = lambda r: sum(w["hit_rate_pct"] for w in r["workers"].values())   # noqa: E731
    assert hits(ca) > hits(ll)


def test_the_simulation_is_deterministic():
    assert run_one("gepa8", "cache_aware", ARGS, MODEL) == run_one("gepa8", "cache_aware", ARGS, MODEL)


def test_skew_leaves_no_worker_idle_while_the_other_queues():
    r = run_one("skew", "cache_aware", ARGS, MODEL)
    assert r["starved_s"] == 0
    assert all(w["requests"] > 0 for w in r["workers"].values())


def test_chat_serves_every_turn_and_cache_aware_keeps_conversations_cached():
    args = argparse.Namespace(**{**vars(ARGS), "conversations": 128, "turns": 6})   # 32 at scale 0.25
    ll = run_one("chat", "least_loaded", args, MODEL)
    ca = run_one("chat", "cache_aware", args, MODEL)
    assert ll["requests"] == ca["requests"] == 32 * 6
    assert ca["cached_share"] > ll["cached_share"]
