"""``python -m bench.batch_scale`` runs the real command line and checks its own output count (figures not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_batch_scale_reports_time_rate_and_rss(tmp_path):
    out = tmp_path / "batch.json"
    proc = subprocess.run([sys.executable, "-m", "bench.batch_scale", "--lines", "500,2000",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["lines"] for r in rows] == [500, 2000]
    for r in rows:
        assert r["wall_s"] > 0 and r["requests_per_s_wall"] > 0 and r["job_s"] is not None
        assert r["peak_rss_mib"] > 0 and r["worker_peak_rss_mib"] > 0
