"""The main job, `mpdp generate`, end to end on the echo engine (the hf run is the README's example)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_generate_writes_results_in_input_order_and_bad_lines_fail_alone(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) for i in range(50)]
    lines.insert(10, "this is not json")
    lines.insert(20, json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 3}))
    lines.insert(30, json.dumps({"id": "bad", "prompt": "x", "temperature": -1}))
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(src),
                           "--output", str(out), "--engine", "echo", "--num-workers", "2"],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, proc.stderr          # two requests failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 53
    good = [r for r in rows if r["id"] not in (11, "chat", "bad")]
    assert [r["text"] for r in good] == [f"prompt {i}" for i in range(50)]
    assert [r["id"] for r in good] == [f"r{i}" for i in range(50)]
    assert rows[10]["id"] == 11 and "line 11" in rows[10]["error"]     # no id: the line number
    assert rows[20] == {"id": "chat", "text": "hel", "finish_reason": "length",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    assert rows[30]["id"] == "bad" and "temperature" in rows[30]["error"]
    assert "53 requests (2 failed)" in proc.stderr
    assert "worker 0:" in proc.stderr and "worker 1:" in proc.stderr
