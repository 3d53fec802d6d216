"""The main job, `mpdp generate`, end to end on the echo engine (the hf run is the README's example).

More of the job (OpenAI batch files, resume, stops, checks) is in tests/test_batch_*.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=timeout)


def test_generate_writes_results_in_input_order_and_bad_requests_fail_alone(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) for i in range(50)]
    lines.insert(20, json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 3}))
    lines.insert(30, json.dumps({"id": "bad", "prompt": "x", "temperature": -1}))
    lines.insert(40, "")                                 # blank lines are skipped
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = generate("--input", str(src), "--output", str(out), "--engine", "echo", "--num-workers", "2")
    assert proc.returncode == 1, proc.stderr          # one request failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 52
    good = [r for r in rows if r["id"] not in ("chat", "bad")]
    assert [r["text"] for r in good] == [f"prompt {i}" for i in range(50)]
    assert [r["id"] for r in good] == [f"r{i}" for i in range(50)]
    assert rows[20] == {"id": "chat", "text": "hel", "finish_reason": "length",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    assert rows[30]["id"] == "bad" and "temperature" in rows[30]["error"]
    assert "wrote 52 results (1 failed)" in proc.stderr
    table = proc.stderr[proc.stderr.index("worker  results"):].splitlines()
    assert [row.split()[0] for row in table[1:5]] == ["0", "1", "failed", "total"]
    assert int(table[3].split()[1]) == 1 and int(table[4].split()[1]) == 52    # the table counts the file's lines


def test_a_line_that_is_not_json_is_refused_before_anything_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\nthis is not json\n")
    out = tmp_path / "out.jsonl"
    proc = generate("--input", str(src), "--output", str(out), "--engine", "echo")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "line 2 is not JSON" in proc.stderr
    assert not out.exists()


def test_ids_default_to_line_numbers_and_other_fields_are_carried(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "abc", "answer": "42", "metadata": {"k": 1}}) + "\n"
                   + json.dumps({"id": 7, "prompt": "de", "text": "not mine", "n": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = generate("--input", str(src), "--output", str(out), "--engine", "echo", "--num-workers", "1")
    assert proc.returncode == 0, proc.stderr
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first == {"id": 1, "text": "abc", "finish_reason": "stop", "answer": "42", "metadata": {"k": 1},
                     "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    assert second["id"] == 7 and second["text"] == "de" and second["choices"] == ["de", "de"]   # a result field wins


def test_help_shows_defaults_and_engine_choices():
    proc = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--help"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for expected in ("--max-tokens MAX_TOKENS (default: 256)", "--temperature TEMPERATURE (default: 0.0",
                     "{echo,hf,vllm}", "--window N requests in flight at most", "(default: 8192)"):
        assert expected in text, expected
