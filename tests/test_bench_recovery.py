"""``python -m bench.recovery`` at tiny sizes: a clean round and a round with one SIGKILL, every
request served in both, the killed worker restarted (figures not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_recovery_serves_every_request_through_a_sigkill(tmp_path, no_child_left):
    out = tmp_path / "recovery.json"
    proc = subprocess.run([sys.executable, "-m", "bench.recovery", "--requests", "300", "--rounds", "1",
                           "--capacity", "50", "--delay-s", "0.2", "--kill-after", "0.1", "--settle-s", "0",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["all_served"] and s["requests"] == s["served"] == 600 and s["failed"] == s["wrong"] == 0
    clean, killed = result["rounds"]
    assert (clean["kind"], killed["kind"]) == ("clean", "killed")
    assert killed["killed_pid_in_flight"] > 0          # the SIGKILL landed while it held requests
    assert killed["restart_s"] is not None and killed["restart_s"] > 0
    assert result["workers"][0]["restarts"] == 1 and result["workers"][1]["restarts"] == 0
