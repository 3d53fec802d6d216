"""The DSPy benchmarks' CPU self-checks: they run, count what they claim to count, and honour their
flags. Behaviour only; the figures they print are timings and are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("dspy")

from conftest import wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args: str, tmp_path) -> dict:
    """``python -m bench.<name>`` from the repository root, as the docstrings say to run it."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_dspy_eval_adapters_and_waves(tmp_path, no_child_left):
    """``chat`` makes one LM call a question and ``chat+json`` two (the echo engine's answers never
    parse); ``--waves`` sizes each thread count's question set; every call reaches the pool."""
    rows = {}
    for adapter in ("chat", "chat+json"):
        result = run_script("dspy_eval", "--engine", "echo", "--model", "echo", "--variants", "mpdp2",
                            "--threads", "4,50", "--waves", "3", "--questions", "60", "--adapter", adapter,
                            tmp_path=tmp_path)
        assert result["skipped"] == []
        rows[adapter] = {r["threads"]: r for r in result["rows"]}
    for adapter, calls_per_question in (("chat", 1), ("chat+json", 2)):
        by_threads = rows[adapter]
        assert by_threads[4]["questions"] == 60            # max(60, 3 x 4)
        assert by_threads[50]["questions"] == 150          # max(60, 3 x 50)
        for r in by_threads.values():
            assert r["gpus"] == 2
            assert r["lm_calls"] == calls_per_question * r["questions"]


def test_dspy_client_cost_counts_every_call(tmp_path):
    result = run_script("dspy_client_cost", "--questions", "40", "--threads", "1,8", "--chars", "300",
                        tmp_path=tmp_path)
    got = {(r["adapter"], r["threads"]): r for r in result["rows"]}
    assert set(got) == {("chat", 1), ("chat", 8), ("chat+json", 1), ("chat+json", 8)}
    for (adapter, _), r in got.items():
        assert r["questions"] == 40
        assert r["calls"] == (40 if adapter == "chat" else 80)
        assert r["cpu_ms_per_call"] > 0


def test_gpu_utilization_parses_nvidia_smi_samples(tmp_path, monkeypatch):
    """The sampler reads ``index, percent`` lines per GPU and skips what is not a number."""
    fake = tmp_path / "nvidia-smi"
    printed = tmp_path / "printed"
    fake.write_text("#!/bin/sh\nprintf '0, 50\\n1, 100\\n0, 70\\n1, [N/A]\\n0, 90\\n'\n"
                    f"touch {printed}\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    from bench.gpu_util import GpuUtilization
    with GpuUtilization(interval_ms=100) as util:
        wait_until(printed.exists, timeout=30, what="the fake nvidia-smi to print")
    assert util.summary() == {"0": {"mean": 70.0, "median": 70.0, "samples": 3},
                              "1": {"mean": 100.0, "median": 100.0, "samples": 1}}
