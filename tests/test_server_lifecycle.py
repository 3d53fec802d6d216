"""``mpdp serve`` through its life: the API key and the bind check, /health through ready, a
killed worker and a drain, a client that disconnects (its request aborted inside the engine, seen
with the echo engine's ``!held`` probe), and the grace timeout cancelling what is left. Every
wait is bounded; nothing asserts on timings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import wait_until
from test_server_support import ROOT, ServerProcess, sum_samples

pytestmark = pytest.mark.timeout(180)


def chat(text: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 500, **extra}


def test_a_non_loopback_bind_needs_a_key_or_an_explicit_opt_out():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MPDP_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "mpdp.cli", "serve", "--engine", "echo", "--host", "0.0.0.0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "--allow-unauthenticated" in r.stderr


def test_workers_that_cannot_start_end_the_server_with_their_error(tmp_path):
    # capacity=abc is an option the echo engine takes, with a value only the worker finds wrong
    # (an unknown option is refused before any worker starts: tests/test_front_config.py).
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--engine-option", "capacity=abc", tmp_path=tmp_path,
                      ready=False)
    s.wait_line(r"the workers did not start: .*worker 0", 60)    # the pool's start_error, named
    assert s.proc.wait(60) == 1
    assert any("invalid literal for int()" in line for line in s.lines)
    assert s.stop() == 1


def test_the_api_key_guards_v1_but_not_health(tmp_path):
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", "--api-key", "sekrit",
                      tmp_path=tmp_path)
    try:
        assert any("needs the API key" in line for line in s.lines)
        r = httpx.post(s.base + "/chat/completions", json=chat("hi"), timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=s.base, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(**chat("hi"))
        good = openai.OpenAI(base_url=s.base, api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(**chat("let me in")).choices[0].message.content == "let me in"
        assert s.health()[0] == 200
    finally:
        assert s.stop() == 0


def test_health_through_start_ready_a_killed_worker_and_a_drain(tmp_path):
    s = ServerProcess("--engine", "echo", "--num-workers", "2", "--served-model-name", "m",
                      "--engine-option", "delay_s=1.5", "--shutdown-grace", "60", tmp_path=tmp_path, ready=False)
    seen_before_ready = []
    while True:                              # bounded by the wait below
        code, body = s.health()
        seen_before_ready.append((code, body["status"]))
        if code == 200:
            break
        assert code == 503 and body["status"] in ("starting", "degraded")
        assert len(seen_before_ready) < 2000, "never ready"
        time.sleep(0.01)
    body = s.health()[1]
    assert body["status"] == "ready" and [w["state"] for w in body["workers"]] == ["ready", "ready"]

    # A killed worker: 503 (not every worker serves) until it is back, then 200 with a restart counted.
    victim = body["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    statuses = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code, body = s.health()
        statuses.add((code, body["status"]))
        if code == 200 and body["workers"][0]["restarts"] == 1:
            break
    assert (503, "degraded") in statuses and body["workers"][0]["pid"] != victim
    assert sum_samples(s.metrics(), "mpdp:worker_restarts_total", worker="0") == 1

    # A drain: SIGTERM with a stream in flight: health 503 "draining", new requests 503, the stream
    # finishes whole, the process exits 0 and leaves no worker behind.
    result = {}

    def stream():
        with httpx.stream("POST", s.base + "/chat/completions", json=chat("finish me", stream=True),
                          timeout=60) as r:
            result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: sum_samples(s.metrics(), "mpdp:num_requests_running") == 1, 30, what="the stream to run")
    s.proc.send_signal(signal.SIGTERM)
    body = wait_until(lambda: (lambda c, b: b if c == 503 else None)(*s.health()), 30, what="a draining health")
    assert body["status"] == "draining"
    r = httpx.post(s.base + "/chat/completions", json=chat("too late"), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    t.join(60)
    assert result["lines"][-1] == "data: [DONE]"
    text = "".join(c["delta"].get("content") or "" for line in result["lines"][:-1]
                   for c in json.loads(line[6:])["choices"])
    assert text == "finish me"
    assert s.stop(timeout=60) == 0


def test_a_client_that_disconnects_has_its_request_aborted_in_the_engine(tmp_path):
    # delay_s=120: a request is held that long unless aborted; "!held" answers at once with the ids held.
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m",
                      "--engine-option", "faults=true", "--engine-option", "delay_s=120",
                      "--shutdown-grace", "1", tmp_path=tmp_path)
    client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=30)

    def held() -> str:
        return client.chat.completions.create(**chat("!held")).choices[0].message.content

    try:
        assert held() == ""
        # A stream: read its first pieces, then leave.
        with httpx.stream("POST", s.base + "/chat/completions", json=chat("a long answer " * 5, stream=True),
                          timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert all(line.startswith("data: ") or not line for line in got)
            assert held() != ""                  # the engine holds it while the client listens
        wait_until(lambda: held() == "", 30, what="the stream to be aborted in the engine")

        # A non-streamed request whose client times out (closes the connection).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base + "/chat/completions", json=chat("wait for me"), timeout=1.0)
        wait_until(lambda: held() == "", 30, what="the request to be aborted in the engine")
        assert sum_samples(s.metrics(), "mpdp:request_failure_total", reason="aborted") == 2

        # The grace timeout: a request still running when it passes is cancelled; exit 0 all the same.
        t = threading.Thread(target=lambda: httpx.post(s.base + "/chat/completions", json=chat("never done"),
                                                       timeout=60), daemon=True)
        t.start()
        wait_until(lambda: held() != "", 30, what="the request to be held")
    finally:
        assert s.stop(timeout=60) == 0
    assert any("grace of 1s passed" in line for line in s.lines)


def test_a_stream_whose_client_leaves_before_its_first_token_is_aborted_quietly(tmp_path):
    # capacity=1, delay_s=120: the first request holds the engine; a stream sent next waits in the
    # pool for its first token (its answer begins with it), and its client gives up meanwhile.
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m",
                      "--engine-option", "capacity=1", "--engine-option", "delay_s=120",
                      "--shutdown-grace", "1", tmp_path=tmp_path)
    holder = threading.Thread(target=lambda: httpx.post(s.base + "/chat/completions", json=chat("hold"), timeout=90),
                              daemon=True)
    try:
        holder.start()
        wait_until(lambda: sum_samples(s.metrics(), "mpdp:num_requests_pending") == 1, 60, what="the holder")
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", s.base + "/chat/completions", json=chat("wait", stream=True), timeout=2):
                pass
        wait_until(lambda: sum_samples(s.metrics(), "mpdp:num_requests_pending") == 1
                   and sum_samples(s.metrics(), "mpdp:request_failure_total", reason="aborted") == 1, 60,
                   what="the stream to be aborted in the pool")
    finally:
        assert s.stop(timeout=60) == 0
        holder.join(60)
    assert "Exception in ASGI application" not in "\n".join(s.lines), s.lines
