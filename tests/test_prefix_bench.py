"""bench/prefix.py's CPU self-check: with the echo engine and tiny sizes it runs every workload
under every policy, swaps the pool's policy between runs, and writes its JSON. Timings are not
asserted; the micro-benchmark's shape is."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from collections import Counter

from bench.prefix import WORKLOADS, Text, add_workload_arguments, build, fresh, run_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = {"least_loaded", "prefix_affinity", "cache_aware"}


def run(*args: str, out) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.prefix", *args, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_echo_compares_the_mirror_and_the_event_index_with_ttft(tmp_path, no_child_left):
    # echo has no KV events: cache_aware:events=true falls back to the mirror, and the run's shape is what counts
    result = run("--engine", "echo", "--scale", "0.03", "--rounds", "1", "--threads", "8", "--settle-s", "0",
                 "--workloads", "tenants,docqa", "--stream",
                 "--policies", "least_loaded,cache_aware,cache_aware:events=true", out=tmp_path / "ev.json")
    assert set(result["summary"]["tenants"]) == {"least_loaded", "cache_aware", "cache_aware:events=true"}
    for r in result["runs"]:
        assert r["errors"] == 0 and r["ttft_p90_s"] is not None and r["latency_p90_s"] is not None
        assert r["cached_tokens"] is None and set(r["predictions"]) >= {"exact_within_block_share"}


def test_echo_smoke_run_covers_every_workload_and_policy(tmp_path, no_child_left):
    result = run("--engine", "echo", "--scale", "0.03", "--rounds", "2", "--threads", "8", "--settle-s", "0",
                 out=tmp_path / "prefix.json")
    assert set(result["summary"]) == {"docqa", "gepa64", "gepa8", "random", "skew", "tenants", "chat"}
    for workload, by_policy in result["summary"].items():
        assert set(by_policy) == POLICIES, workload
        assert by_policy["least_loaded"]["ratio_to_least_loaded"] == 1.0
        assert all(len(row["rounds"]) == 2 for row in by_policy.values())
    for r in result["runs"]:
        assert r["errors"] == 0 and r["requests"] > 0
        assert sum(w["requests"] for w in r["workers"].values()) == r["requests"]
        assert set(r["engine_log"]) == {"0", "1"}                # one entry per worker
        # Each request's route, in start order, and how the prefix groups spread over the workers.
        assert len(r["routes"]) == r["requests"]
        assert [row[0] for row in r["routes"]] == sorted(row[0] for row in r["routes"])
        assert {row[2] for row in r["routes"]} <= {0, 1}
        spread = r["spread"]
        assert spread["groups"] == len({row[1] for row in r["routes"]})
        assert 0 <= spread["on_several_workers"] <= spread["groups"]
    random_runs = [r for r in result["runs"] if r["workload"] == "random"]
    assert all(r["spread"]["groups"] == r["requests"] and r["spread"]["moves"] == 0 for r in random_runs)
    least = [r for r in result["runs"] if r["workload"] == "docqa" and r["policy"] == "least_loaded"]
    assert any(r["spread"]["moves"] > 0 for r in least)           # by load alone, documents move
    assert "not reachable" in result["vllm_hit_rate_source"]      # echo logs no vLLM stats


def test_every_policy_of_a_round_gets_the_same_draw_under_a_tag_of_its_own(tmp_path, no_child_left):
    # A new draw per policy made the draw's difficulty part of the comparison. Now each round draws
    # once: the same tenants the same number of times for every policy, a new draw the next round.
    result = run("--engine", "echo", "--scale", "0.03", "--rounds", "2", "--threads", "4", "--settle-s", "0",
                 "--workloads", "tenants", "--tenants", "400", "--tenant-requests", "2000",
                 "--policies", "least_loaded,cache_aware", out=tmp_path / "draw.json")
    profile = {}
    for r in result["runs"]:
        sizes = sorted(Counter(row[1] for row in r["routes"]).values())
        profile.setdefault(r["round"], set()).add(tuple(sizes))
    assert len(result["runs"]) == 4 and set(profile) == {0, 1}
    assert all(len(p) == 1 for p in profile.values())        # one draw for both policies of a round
    assert profile[0] != profile[1]                           # and a new one the next round


def test_fresh_tags_the_front_of_each_request_and_leaves_the_draw_alone():
    base = build("tenants", Text(None, "echo"), 5, 0.05, workload_args())
    chat = build("chat", Text(None, "echo"), 5, 0.05, workload_args())
    one, two = fresh(base, 1), fresh(base, 2)
    assert [r["prompt"] for r in one] == ["Run 1. " + r["prompt"] for r in base]
    assert {r["prompt"][:7] for r in two} == {"Run 2. "} and "Run" not in base[0]["prompt"][:3]
    tagged = fresh(chat, 3)
    for before, after in zip(chat, tagged):
        assert after["messages"][0]["content"] == "Run 3. " + before["messages"][0]["content"]
        assert after["messages"][1:] == before["messages"][1:] and after["conversation"] == before["conversation"]


def test_micro_reports_each_policy_against_least_loaded(tmp_path):
    result = run("--micro", "--micro-requests", "300", "--micro-repeats", "1", out=tmp_path / "micro.json")
    assert set(result["policies"]) == POLICIES
    assert result["policies"]["least_loaded"]["ratio_to_least_loaded"] == 1.0
    assert all(row["dispatcher_us_per_request"] > 0 for row in result["policies"].values())
    events = result["kv_events"]                                  # routing by the engines' KV events
    assert events["per_event"]["stored_apply_us"] > 0 and events["per_event"]["removed_apply_us"] > 0
    assert events["per_request"]["dispatcher_us_per_request_with_events"] > 0


def workload_args(**over) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_workload_arguments(ap)
    return argparse.Namespace(**{**vars(ap.parse_args([])), **over})


class Recording:
    """A pool's submit and stream, recording what each call was given and when it began and ended."""

    def __init__(self, pool):
        self.pool, self.engine = pool, pool.engine
        self.calls: list[tuple[float, float, dict]] = []
        self.lock = threading.Lock()

    def _record(self, t0, body):
        with self.lock:
            self.calls.append((t0, time.monotonic(), body))

    def submit(self, **body):
        t0 = time.monotonic()
        c = self.pool.submit(**body).result()     # raises on a key the pool does not know
        self._record(t0, body)
        done = type("Done", (), {"result": lambda self: c})
        return done()


def test_other_workloads_are_unchanged_by_chat():
    # the requests a seed builds for the workloads before chat: no bench-only keys, flat order
    text = Text(None, "echo")
    args = workload_args()
    for workload in WORKLOADS:
        if workload != "chat":
            assert all(set(r) <= {"prompt", "messages"} for r in build(workload, text, 3, 0.03, args))


def test_chat_sends_each_conversations_turns_in_order_each_after_the_last_finished(make_pool):
    text = Text(None, "echo")
    requests = build("chat", text, 7, 0.05, workload_args(conversations=240, turns=5))   # 12 at scale 0.05
    assert len(requests) == 12 * 5
    pool = Recording(make_pool(engine_options={"delay_s": 0.02}))
    # fewer callers than conversations: a caller finishes one conversation and takes another
    row = run_once(pool, requests, threads=4, max_tokens=4)
    assert row["requests"] == 60 and row["errors"] == 0
    by_conversation: dict[str, list] = {}
    for t0, t1, body in pool.calls:
        assert set(body) == {"messages", "max_tokens", "temperature"}        # bench keys stripped
        by_conversation.setdefault(body["messages"][0]["content"], []).append((t0, t1, body["messages"]))
    assert len(by_conversation) == 12
    for turns in by_conversation.values():
        turns.sort()
        assert len(turns) == 5
        for (_, end, before), (start, _, after) in zip(turns, turns[1:]):
            assert start >= end                              # started once the previous turn finished
            assert after[:len(before)] == before             # the history so far, extended
            assert [m["role"] for m in after[len(before):]] == ["assistant", "user"]
        assert [m["role"] for m in turns[0][2]] == ["system", "user"]
