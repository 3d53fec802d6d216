"""The server baseline's launcher (bench/vllm_servers.py) against a stand-in for vLLM's api_server:
one per GPU on its own port, up when /health answers, counters summed, a server that dies reported
with its log, and nothing left behind — the engine-core child included."""

from __future__ import annotations

import sys
import textwrap

import psutil
import pytest

from bench.vllm_servers import VllmServers, cli_flags

FAKE_SERVER = textwrap.dedent('''
    """Answers like vLLM's api_server: --help, /health, /metrics; forks an "engine core" child."""
    import argparse, http.server, os, subprocess, sys, time
    if "--help" in sys.argv:
        print("usage: api_server [--disable-log-requests] [--port PORT]")
        sys.exit(0)
    p = argparse.ArgumentParser()
    for flag in ("--model", "--served-model-name", "--host", "--load-format"):
        p.add_argument(flag)
    p.add_argument("--port", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--disable-log-requests", action="store_true")
    a = p.parse_args()
    print("args", sys.argv[1:], "gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    if a.model == "broken" or (a.model == "second-breaks" and gpu == "1"):
        print("RuntimeError: no CUDA device", flush=True)
        sys.exit(3)
    if a.model == "second-breaks":       # GPU 0 never comes up
        time.sleep(600)
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(os.environ["FAKE_PIDS"], str(a.port)), "w") as f:
        f.write(str(core.pid))
    time.sleep(0.5)                      # not healthy at once

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/health": "", "/metrics": (
                "# HELP vllm:request_success_total ok\\n"
                'vllm:request_success_total{finished_reason="stop"} 3.0\\n'
                'vllm:request_success_total{finished_reason="length"} 4.0\\n'
                "vllm:generation_tokens_total 1000.0\\n"
                "vllm:prompt_tokens_total 55.0\\n")}.get(self.path)
            self.send_response(404 if body is None else 200)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", a.port), H).serve_forever()
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "api_server.py"
    script.write_text(FAKE_SERVER)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    return [sys.executable, str(script)], pids


def test_one_server_per_gpu_counters_and_clean_stop(fake, tmp_path, no_child_left):
    command, pids = fake
    servers = VllmServers("m", ["0", "1"], {"load_format": "dummy", "enforce_eager": True},
                          tmp_path / "logs", timeout=60, command=command)
    try:
        assert len(set(servers.ports)) == 2 and len(servers.start_s) == 2
        assert servers.metrics() == {"requests": 14.0, "tokens": 2000.0}      # 2 x (3 + 4), 2 x 1000
        for i, log in enumerate(servers.logs):
            text = log.read_text()
            assert f"gpu {i}" in text
            assert "'--load-format', 'dummy'" in text and "--enforce-eager" in text
            assert "--disable-log-requests" in text       # the help listed it
        cores = [psutil.Process(int((pids / str(port)).read_text())) for port in servers.ports]
        assert all(c.is_running() for c in cores)
    finally:
        servers.stop()
    for core in cores:                                     # the servers' children went with them
        assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE


def test_a_server_that_exits_is_reported_with_its_log(fake, tmp_path, no_child_left):
    command, _ = fake
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*no CUDA device"):
        VllmServers("broken", ["0", "1"], {}, tmp_path / "logs", timeout=60, command=command)


def test_a_later_server_that_exits_is_seen_while_waiting_for_an_earlier_one(fake, tmp_path, no_child_left):
    command, _ = fake
    with pytest.raises(RuntimeError, match="server 1 exited with 3"):
        VllmServers("second-breaks", ["0", "1"], {}, tmp_path / "logs", timeout=120, command=command)


def test_cli_flags():
    assert cli_flags({"load_format": "dummy", "enforce_eager": True, "quantization": None,
                      "enable_prefix_caching": False, "max_num_seqs": 512,
                      "compilation_config": {"level": 3}}) == [
        "--load-format", "dummy", "--enforce-eager", "--max-num-seqs", "512",
        "--compilation-config", '{"level": 3}']
