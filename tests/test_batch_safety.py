"""`mpdp generate` never loses or duplicates a result: the output being the input, two runs on one
output, an input that is a pipe, a write that fails part-way (a full disk), and a summary that
agrees with its table and with the file. The echo engine (slowed with ``delay_s`` where a run must
still be going) drives the plumbing; every wait is bounded, and where a test needs a run to be at
some point it holds it there (a pipe left open) instead of racing a clock."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import Future

import pytest

from conftest import wait_until
from mpdp.batch import formats, output
from mpdp.batch.progress import Progress, worker_table
from mpdp.batch.window import OrderedWindow
from test_batch_cli import SLOW, env_for, ids_in, lines_of, write_simple

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = ["--engine", "echo", "--num-workers", "2", "--no-progress"]


def generate(tmp_path, *args, cwd=None, stdin=None, prefix=(), timeout=150) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "mpdp.cli", "generate", *args], cwd=cwd or ROOT,
                          env=env_for(tmp_path), stdin=stdin, capture_output=True, text=True, timeout=timeout)


def start(tmp_path, *args) -> subprocess.Popen:
    """A run whose input is a pipe this test holds open: it stays before its pre-flight until closed."""
    return subprocess.Popen([sys.executable, "-m", "mpdp.cli", "generate", *args], cwd=ROOT, env=env_for(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
    except BrokenPipeError:          # it has already exited (the run that lost the lock)
        pass


def flock_holders(path) -> list[int]:
    """The pids holding a flock on ``path``, from the kernel's table (not from the code under test)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return [int(fields[4]) for fields in map(str.split, f)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" and fields[5] == want]


def result_lines(ids) -> str:
    return "".join(json.dumps({"id": i, "text": "old"}) + "\n" for i in ids)


# -- 1. the output is the input ------------------------------------------------------------------------
def same_file_setups(tmp_path):
    """(--input, --output, cwd, stdin) naming one file in different ways."""
    src = tmp_path / "in.jsonl"
    (tmp_path / "link.jsonl").symlink_to("in.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    return {
        "same path": (str(src), str(src), None, None),
        "./x vs x": ("in.jsonl", "./in.jsonl", tmp_path, None),
        "symlink": (str(src), str(tmp_path / "link.jsonl"), None, None),
        "hard link": (str(src), str(tmp_path / "hard.jsonl"), None, None),
        "/dev/stdin": ("/dev/stdin", str(src), None, src),
        "-": ("-", str(src), None, src),
    }


@pytest.mark.parametrize("again", ["--overwrite", "--resume"])
@pytest.mark.parametrize("how", ["same path", "./x vs x", "symlink", "hard link", "/dev/stdin", "-"])
def test_the_output_being_the_input_is_refused_before_any_worker(tmp_path, how, again):
    src = tmp_path / "in.jsonl"
    write_simple(src, 10)
    before = src.read_bytes()
    inp, out, cwd, stdin = same_file_setups(tmp_path)[how]
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        proc = generate(tmp_path, "--input", inp, "--output", out, again, *ECHO, cwd=cwd, stdin=f)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("mpdp generate: error:") and "is the input file" in proc.stderr
    assert "workers ready" not in proc.stderr
    assert src.read_bytes() == before                           # not one request lost


# -- 2. one run at a time on an output -------------------------------------------------------------------
def test_two_resumes_at_once_one_runs_the_other_exits_2_naming_it(tmp_path):
    """Both start together, each on a pipe this test holds open, so neither can finish before the
    other has tried the lock: exactly one must refuse, naming the other's pid."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 40)
    out.write_text(result_lines(ids[:10]))
    args = ["--input", "-", "--output", str(out), "--resume", *SLOW, "--no-progress"]
    runs = [start(tmp_path, *args), start(tmp_path, *args)]
    try:
        for proc in runs:
            feed(proc, src.read_bytes())
        loser = wait_until(lambda: next((p for p in runs if p.poll() is not None), None), 60,
                           what="one of the two runs to refuse")
        winner = runs[1 - runs.index(loser)]
        err = loser.stderr.read().decode()
        assert loser.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "being written by another run" in err
        assert f"pid {winner.pid}" in err
        assert winner.poll() is None and flock_holders(out) == [winner.pid]
        winner.stdin.close()
        assert winner.wait(120) == 0, winner.stderr.read().decode()
    finally:
        for proc in runs:
            proc.kill()
            proc.wait(30)
    assert ids_in(out) == ids                                   # every id once, in input order
    assert flock_holders(out) == []
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "tmpdir"]   # no lock file


def test_a_second_run_waits_for_nothing_after_the_first_was_killed(tmp_path):
    """The lock is the kernel's: SIGKILL frees it and leaves no file that would block a resume."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 20)
    out.write_text(result_lines(ids[:5]))
    first = start(tmp_path, "--input", "-", "--output", str(out), "--resume", *ECHO)
    try:
        wait_until(lambda: flock_holders(out) == [first.pid], 60, what="the first run to lock the output")
        first.kill()
        first.wait(30)
    finally:
        first.kill()
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", *ECHO)
    assert again.returncode == 0, again.stderr
    assert ids_in(out) == ids
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "tmpdir"]


def test_a_refused_run_leaves_no_empty_output_behind(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    proc = generate(tmp_path, "--input", str(src), "--output", str(tmp_path / "o.jsonl"), *ECHO)
    assert proc.returncode == 2 and "line 2 is not JSON" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


# -- 3. an input that can be read once -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_a_pipe_is_read_once_and_every_request_runs(tmp_path, name):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 50)
    cat = subprocess.Popen(["cat", str(src)], stdout=subprocess.PIPE)       # a real pipe, as a shell makes
    try:
        proc = generate(tmp_path, "--input", name, "--output", str(out), *ECHO, stdin=cat.stdout)
    finally:
        cat.stdout.close()
        cat.wait(30)
    assert proc.returncode == 0, proc.stderr
    assert ids_in(out) == ids
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [f"p {i}" for i in range(50)]
    assert os.listdir(tmp_path / "tmpdir") == []                 # the private copy is gone


def test_a_bad_line_in_a_pipe_is_named_as_the_user_gave_it(tmp_path):
    data = b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\nnot json\n'
    proc = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", "-", "--output",
                           str(tmp_path / "o.jsonl"), *ECHO], cwd=ROOT, env=env_for(tmp_path), input=data,
                          capture_output=True, timeout=150)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "--input -: line 3 is not JSON" in err and "/proc" not in err and "mpdp-input" not in err


def test_a_closed_standard_input_is_said_to_be_closed(tmp_path):
    """Not read as whatever file took descriptor 0 (the output, once it is opened to be locked)."""
    out = tmp_path / "o.jsonl"
    proc = subprocess.run(["bash", "-c", 'exec "$0" -m mpdp.cli generate --input - --output "$1" '
                           '--engine echo <&-', sys.executable, str(out)], cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 2 and "standard input is closed" in proc.stderr, proc.stderr
    assert not out.exists()


def test_sigint_while_a_pipe_is_read_leaves_no_copy(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = start(tmp_path, "--input", "-", "--output", str(out), *ECHO)
    try:
        feed(proc, b'{"id": "a", "prompt": "x"}\n')               # and the pipe stays open
        wait_until(lambda: out.exists() and flock_holders(out) == [proc.pid], 60, what="the run to start reading")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"stopped by SIGINT before the workers were ready" in err
    assert os.listdir(tmp_path / "tmpdir") == [] and not out.exists()


# -- 4. a write that fails part-way ----------------------------------------------------------------------
LIMITED = """\
import resource, runpy, signal, sys
limit = int(sys.argv.pop(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # past the limit write() fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "mpdp"
runpy.run_module("mpdp.cli", run_name="__main__")
"""


def test_a_full_file_system_reports_what_is_on_disk_and_resume_finishes(tmp_path):
    """RLIMIT_FSIZE makes the kernel take part of a write and refuse the rest (EFBIG, SIGXFSZ
    ignored), as a full disk does with ENOSPC: the count said must be the complete lines there."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"p {i}", "pad": "x" * 200}) + "\n"
                           for i in range(300)))
    ids = [f"r{i}" for i in range(300)]
    limit = 20_000 + 117                            # some line is cut by it
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(limit), "generate", "--input", str(src),
                           "--output", str(out), *ECHO], cwd=ROOT, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 1, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    data = out.read_bytes()
    complete = data.count(b"\n")
    assert f"wrote {complete} of 300 results; rerun with --resume to finish" in proc.stderr
    assert f"this run wrote {complete} results (0 failed)" in proc.stderr
    assert 0 < complete < 300 and data.endswith(b"\n")           # no torn line left in the file
    assert ids_in(out) == ids[:complete]
    again = generate(tmp_path, "--input", str(src), "--output", str(out), "--resume", *ECHO)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {complete} of 300 results already in" in again.stderr
    assert ids_in(out) == ids


def test_the_writer_counts_the_complete_lines_a_failed_write_left(tmp_path, monkeypatch):
    """A write layer that takes 2.5 lines of a batch and then fails with ENOSPC."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "old"}\n')
    progress = Progress(10, 1, enabled=False)
    with open(path, "ab") as f:
        writer = output.DurableWriter(f, 3600, progress.advance)
        rows = [({"id": f"r{i}", "text": "t" * 10}, 10, 0) for i in range(5)]
        line = len(json.dumps(rows[0][0]).encode()) + 1
        budget, real_write = [int(line * 2.5)], os.write

        def full_disk(fd, data):
            if budget[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, bytes(data[:budget[0]]))
            budget[0] -= n
            return n

        monkeypatch.setattr(output.os, "write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            writer.write(rows)
        monkeypatch.setattr(output.os, "write", real_write)
        writer.close()
    assert writer.written == 2 and progress.written == 3 and progress.by_worker == {0: [2, 20]}
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["old", "r0", "r1"]


# -- 18. the summary, the table and the file count the same results --------------------------------------
def test_after_sigint_the_summary_the_table_and_the_file_agree(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_simple(src, 300)
    lines = src.read_text().splitlines()
    lines[1] = json.dumps({"id": "r1", "prompt": "p 1", "temperature": -1})      # fails alone, never on a worker
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(src), "--output", str(out),
                             *SLOW, "--no-progress"], cwd=ROOT, env=env_for(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: lines_of(out) >= 6, 90, what="the first results")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    written = lines_of(out)
    summary = re.search(r"this run wrote (\d+) results \((\d+) failed\)", err)
    assert summary and int(summary[1]) == written and int(summary[2]) == 1, err
    table = err[err.index("  worker  results"):].splitlines()
    total = next(row.split() for row in table if row.split()[0] == "total")
    failed = next(row.split() for row in table if row.split()[0] == "failed")
    assert int(total[1]) == written and int(failed[1]) == 1, err
    assert f"wrote {written} of 300 results; rerun with --resume to finish" in err
    assert ids_in(out) == ids[:written]


def test_the_window_tells_aborted_from_finished_but_unwritten():
    window = OrderedWindow(10, lambda item, outcome: ({}, 0, 0), None)
    futures = [Future() for _ in range(4)]
    for i, f in enumerate(futures):
        window.push(formats.Item(i, "simple", {}), f)
    futures[1].set_result(None)
    futures[3].set_exception(ValueError("failed alone"))
    assert window.cancel_all() == (2, 2) and len(window) == 0


def test_the_worker_table_counts_the_rows_written():
    progress = Progress(10, 4, enabled=False)
    progress.advance([({}, 5, 0), ({}, 7, 1), ({}, 0, None), ({}, 3, 1)])
    table = worker_table(progress, {"workers": [{"index": 0, "restarts": 1}, {"index": 1, "restarts": 0},
                                                {"index": 2, "restarts": 2}]})
    rows = [row.split() for row in table.splitlines()]
    assert rows[0] == ["worker", "results", "tokens", "restarts"]
    assert rows[1:] == [["0", "1", "5", "1"], ["1", "2", "10", "0"], ["2", "0", "0", "2"],
                        ["failed", "1", "0", "-"], ["total", "4", "15", "3"]]
    assert progress.written == 8 and progress.failures == 1



def test_sigint_while_lines_that_fail_alone_are_written_says_what_is_on_disk(tmp_path, monkeypatch, capsys):
    """No worker is needed when every line fails alone; a stop then must still land between two
    writes and count the lines in the file (not the ones there before this run)."""
    from mpdp.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "x", "temperature": -1}) + "\n" for i in range(1000)))
    real_write, sent = output.DurableWriter.write, []

    def write_then_sigint(self, rows):
        real_write(self, rows)
        if rows and not sent:                    # the first batch is in the file: Ctrl-C
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(output.DurableWriter, "write", write_then_sigint)
    code = main(["generate", "--input", str(src), "--output", str(out), "--engine", "echo", "--no-progress"])
    err = capsys.readouterr().err
    written = lines_of(out)
    assert code == 130 and 0 < written < 1000, err
    assert f"wrote {written} of 1000 results; rerun with --resume to finish" in err
    assert re.search(rf"this run wrote {written} results \({written} failed\)", err), err
    assert ids_in(out) == [f"r{i}" for i in range(written)]
