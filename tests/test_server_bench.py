"""The server's benchmark scripts run (tiny sizes) and report what they claim to measure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_server_support import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(240)


def test_serve_vs_vllm_against_the_echo_server(tmp_path):
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", "--engine-option",
                      "stream_piece=4", "--engine-option", "delay_s=0.2", tmp_path=tmp_path)
    try:
        for client in ("httpx", "light"):          # both count the same tokens and content chunks
            out = tmp_path / f"load-{client}.json"
            r = subprocess.run([sys.executable, "-m", "bench.serve_vs_vllm", "--base-url", s.base, "--model", "m",
                                "--concurrency", "8", "--requests", "33", "--max-tokens", "40", "--client", client,
                                "--procs", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            figures = json.loads(out.read_text())
            # 33 over 2 client processes: an uneven split, all counted once
            assert figures["failures"] == 0 and figures["output_tokens"] == 33 * 40 and figures["client_procs"] == 2
            assert figures["output_tokens_per_s"] > 0 and figures["ttft_p50_ms"] <= figures["ttft_p99_ms"]
            # 40 characters in pieces of 4: at most 10 content chunks a stream, more than one unless joined
            assert 1 <= figures["chunks_per_request"] <= 10, figures
    finally:
        assert s.stop() == 0


def test_http_overhead_runs(tmp_path):
    out = tmp_path / "overhead.json"
    r = subprocess.run([sys.executable, "-m", "bench.http_overhead", "--requests", "200", "--concurrency", "1", "4",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    assert set(figures["http"]) == {"plain-1", "plain-4", "stream-1", "stream-4"}
    assert all(figures["direct"][c]["requests_per_s"] > 0 for c in ("1", "4"))
