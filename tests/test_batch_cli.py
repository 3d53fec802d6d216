"""`mpdp generate` as users run it: OpenAI batch files, checks before the pool, clean stops,
SIGKILL and --resume. The echo engine is slowed with ``delay_s`` and a small ``capacity`` so a
run is still going when a test stops it; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import wait_until

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = ["--engine", "echo", "--num-workers", "2", "--engine-option", "delay_s=0.1",
        "--engine-option", "capacity=2"]


def env_for(tmp_path) -> dict:
    # A private TMPDIR: the pool's temp folders can be checked without seeing other runs' folders.
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, PYTHONPATH=ROOT, TMPDIR=str(tmp))


def generate(tmp_path, *args, timeout=150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", *args], cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def start(tmp_path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpdp.cli", "generate", *args], cwd=ROOT, env=env_for(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_simple(path, n, prefix="p"):
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"{prefix} {i}"}) + "\n" for i in range(n)))
    return [f"r{i}" for i in range(n)]


def lines_of(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def ids_in(path, key="id"):
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def workers_of(proc) -> list[psutil.Process]:
    return wait_until(lambda: psutil.Process(proc.pid).children(recursive=True), 60, what="the workers")


def gone(processes) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


# -- OpenAI batch files --------------------------------------------------------------------------------
def test_openai_batch_in_openai_batch_out_with_errors_in_place(tmp_path):
    lines = []
    for i in range(30):
        if i % 3 == 0:
            body = {"model": "my-model", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 50}
            lines.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body,
                          "metadata": {"row": i}})
        else:
            lines.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": f"text {i}", "max_tokens": 4}})
    lines[7]["body"]["temperature"] = -1                       # a bad value: fails alone
    lines[12]["body"]["tools"] = [{"type": "function"}]         # not served: fails alone
    lines[15]["body"]["model"] = "NonExistModel"                # vllm run-batch's own test lines
    lines[16]["url"] = "/bad_url"
    lines[17]["body"]["stream"] = "True"
    src, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--engine", "echo", "--num-workers", "2",
                    "--model", "my-model")
    assert proc.returncode == 1, proc.stderr                   # five requests failed, each alone
    assert "5 requests will fail alone" in proc.stderr and "line 8: temperature must be >= 0" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(30)]
    assert len({r["id"] for r in rows}) == 30
    failed = {7: (400, "temperature"), 12: (400, "tools"), 15: (404, "model"), 16: (400, "url"), 17: (400, "stream")}
    for i, row in enumerate(rows):
        if i in failed:       # vllm run-batch's output model: body null, the error at the top level
            status, param = failed[i]
            assert row["response"]["status_code"] == status and row["response"]["body"] is None
            assert row["error"]["param"] == param and row["error"]["message"]
            assert not row["error"]["message"].startswith(("ValueError", "TypeError"))
            continue
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        if i % 3 == 0:
            assert body["object"] == "chat.completion" and body["model"] == "my-model"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": f"question {i}"}
            assert row["metadata"] == {"row": i}
        else:
            assert body["object"] == "text_completion" and body["choices"][0]["text"] == "text"[:4]
            assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert "temperature" in rows[7]["error"]["message"] and "tools" in rows[12]["error"]["message"]
    assert "5 failed" in proc.stderr


def test_lines_that_all_fail_alone_need_no_worker(tmp_path):
    src, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "x", "temperature": -1}) + "\n"
                   + json.dumps({"id": "b", "prompt": "x", "max_tokens": "ten"}) + "\n")
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--engine", "hf", "--num-workers", "1")
    assert proc.returncode == 1 and "workers ready" not in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["param"]) for r in rows] == [("a", "temperature"), ("b", "max_tokens")]
    assert rows[1]["error"] == "max_tokens must be an int, not str"


def test_an_openai_line_without_custom_id_is_named_before_any_worker(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    src.write_text(json.dumps({"invalid_field": "request-1", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}) + "\n"
                   + json.dumps({"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}) + "\n")
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--engine", "hf", "--num-workers", "1")
    assert proc.returncode == 2, proc.stderr
    assert "line 1 has no custom_id" in proc.stderr and "bad lines" not in proc.stderr


# -- checks before the pool ------------------------------------------------------------------------------
def bad_setups(tmp_path):
    src = tmp_path / "in.jsonl"
    write_simple(src, 3)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(src.read_text() + json.dumps({"id": "r1", "prompt": "again"}) + "\n")
    existing = tmp_path / "existing.jsonl"
    existing.write_text('{"id": "r0", "text": "kept"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return {
        "existing output": (["--input", str(src), "--output", str(existing)], "add --resume"),
        "missing output folder": (["--input", str(src), "--output", str(tmp_path / "nope" / "o.jsonl")],
                                  "does not exist"),
        "output folder is a file": (["--input", str(src), "--output", str(a_file / "o.jsonl")], "does not exist"),
        "missing input": (["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                          "cannot read --input"),
        "duplicate ids": (["--input", str(dup), "--output", str(tmp_path / "o.jsonl")], "'r1' is on line 2 and line 4"),
        "bad engine option": (["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--engine-option", "x"],
                              "KEY=VALUE"),
        "bad max tokens": (["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--max-tokens", "0"],
                           "--max-tokens"),
        "unknown model": (["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", "no/such"],
                          "unknown model"),
    }


CASES = ["existing output", "missing output folder", "output folder is a file", "missing input", "duplicate ids",
         "bad engine option", "bad max tokens", "unknown model"]


@pytest.mark.parametrize("case", CASES)
def test_mistakes_are_one_line_and_exit_2_before_any_worker(tmp_path, case):
    """With --engine hf: had a pool started, stderr would say "workers ready" after a model load."""
    args, words = bad_setups(tmp_path)[case]
    proc = generate(tmp_path, *args, "--engine", "hf", "--num-workers", "1")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("mpdp generate: error:") and words in proc.stderr
    assert "Traceback" not in proc.stderr and "workers ready" not in proc.stderr
    assert (tmp_path / "existing.jsonl").read_text() == '{"id": "r0", "text": "kept"}\n'   # never truncated
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", CASES)
def test_mistakes_are_found_before_a_pool_is_made(tmp_path, case, monkeypatch, capsys):
    import mpdp.pool
    from mpdp.cli import main

    def no_pool(*a, **k):
        raise AssertionError("a pool was started before the checks failed")

    monkeypatch.setattr(mpdp.pool, "Pool", no_pool)
    args, words = bad_setups(tmp_path)[case]
    assert main(["generate", *args, "--engine", "hf", "--num-workers", "1"]) == 2
    assert words in capsys.readouterr().err


def test_a_bad_engine_name_lists_the_choices(tmp_path):
    src = tmp_path / "in.jsonl"
    write_simple(src, 1)
    proc = generate(tmp_path, "--input", str(src), "--output", str(tmp_path / "o"), "--engine", "llama")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'llama'" in proc.stderr and "'echo', 'hf', 'vllm'" in proc.stderr


# -- stops and resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_cleanly_and_resume_finishes(tmp_path, sig):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 300)
    proc = start(tmp_path, "--input", str(src), "--output", str(out), *SLOW)
    try:
        workers = workers_of(proc)
        wait_until(lambda: lines_of(out) >= 3, 60, what="the first results")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr
    written = lines_of(out)
    assert f"wrote {written} of 300 results; rerun with --resume to finish" in stderr
    assert 3 <= written < 300 and "Traceback" not in stderr
    assert ids_in(out) == ids[:written]                          # the finished prefix, in input order
    wait_until(lambda: gone(workers), 15, what="the workers to exit")
    assert os.listdir(tmp_path / "tmpdir") == []                 # the pool's temp folders are gone
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", "--engine", "echo")
    assert again.returncode == 0, again.stderr
    assert f"resuming: {written} of 300 results already in" in again.stderr
    assert ids_in(out) == ids


def test_sigkill_then_resume_writes_every_id_exactly_once(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 300)
    proc = start(tmp_path, "--input", str(src), "--output", str(out), *SLOW)
    try:
        workers = workers_of(proc)
        wait_until(lambda: lines_of(out) >= 3, 60, what="the first results")
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    wait_until(lambda: gone(workers), 15, what="the workers to notice their parent died")
    assert len(ids_in(out)) < 300
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", "--engine", "echo")
    assert again.returncode == 0, again.stderr
    assert ids_in(out) == ids
    rerun = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", "--engine", "echo")
    assert rerun.returncode == 0 and "nothing to do" in rerun.stderr and ids_in(out) == ids


def test_resume_repairs_a_torn_last_line(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 5)
    torn = '{"id": "r2", "tex'
    out.write_text(''.join(json.dumps({"id": i, "text": "old"}) + "\n" for i in ids[:2]) + torn)
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", "--engine", "echo",
                    "--num-workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"cutting a torn last line ({len(torn)} bytes)" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ids and [r["text"] for r in rows[:2]] == ["old", "old"]
    assert rows[2]["text"] == "p 2"


@pytest.mark.timeout(900)    # three hf runs, each loading the model: minutes on a loaded 2-core machine
def test_hf_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """Greedy decoding on the embedded SmolLM2: the union of a killed run and its resume is the
    uninterrupted run's output, line for line. ``--window 1`` runs one request at a time, so the
    kill lands between results and every request is decoded alone in both runs."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"Count to {i}."}]})
                           + "\n" for i in range(6)))
    common = ["--engine", "hf", "--num-workers", "1", "--max-tokens", "12", "--temperature", "0", "--window", "1"]
    ref = tmp_path / "ref.jsonl"
    full = generate(tmp_path, "--input", str(src), "--output", str(ref), *common, timeout=400)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "out.jsonl"
    proc = start(tmp_path, "--input", str(src), "--output", str(out), *common)
    try:
        wait_until(lambda: lines_of(out) >= 1, 300, what="the first hf result")
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert lines_of(out) < 6
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", *common, timeout=400)
    assert again.returncode == 0, again.stderr
    assert out.read_text() == ref.read_text()


# -- unusual inputs ------------------------------------------------------------------------------------------
def test_a_lone_surrogate_in_a_line_is_written_escaped_and_fails_no_other_line(tmp_path):
    # "\ud800" is valid JSON but has no UTF-8 form: carried or in an id, it goes back out as the same
    # escape; in a prompt, that request fails alone. Its neighbours are written, nothing crashes.
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n'
                   '{"id": "b", "prompt": "x", "meta": "\\ud800"}\n'
                   '{"id": "c\\udc00", "prompt": "yo"}\n'
                   '{"id": "d", "prompt": "p\\ud800"}\n'
                   '{"id": "e", "prompt": "last"}\n')
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--engine", "echo", "--num-workers", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c\udc00", "d", "e"]
    assert rows[1]["meta"] == "\ud800" and rows[2]["text"] == "yo" and "error" in rows[3]
    assert rows[4]["text"] == "last"
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--engine", "echo", "--resume")
    assert again.returncode == 0 and "all 5 results are in" in again.stderr, again.stderr


def test_resume_runs_an_id_whose_python_hash_matches_a_written_one(tmp_path):
    # hash(-1) == hash(-2) and hash(1) == hash(2**61): each is its own id, and resume must run it.
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [-1, -2, 1, 2 ** 61]
    src.write_text("".join(json.dumps({"id": i, "prompt": f"p {i}"}) + "\n" for i in ids))
    out.write_text("".join(json.dumps({"id": i, "text": "old"}) + "\n" for i in (-1, 1)))
    proc = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", "--engine", "echo",
                    "--num-workers", "1")
    assert proc.returncode == 0 and "resuming: 2 of 4 results already in" in proc.stderr, proc.stderr
    assert ids_in(out) == [-1, 1, -2, 2 ** 61]


def test_the_output_may_be_a_pipe(tmp_path):
    src = tmp_path / "in.jsonl"
    ids = write_simple(src, 20)
    proc = generate(tmp_path, "--input", str(src), "--output", "/dev/stdout", "--engine", "echo", "--num-workers", "2",
                    "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == ids
