"""k OpenAI-compatible vLLM servers, one per GPU on loopback: the baseline users run today.

Both GPU benchmarks (`scaling.py`, `dspy_eval.py`) compare mpdp against this, so the launch, the
readiness check, the counters and the shutdown live here once.

    servers = VllmServers(model, gpus=["0", "1"], options={"load_format": "dummy"}, log_dir=Path("logs"))
    servers.ports          # one free loopback port per GPU
    servers.metrics()      # {"requests": ..., "tokens": ...} summed over the servers' Prometheus counters
    servers.stop()

Each server is started in a session of its own (``start_new_session``) because vLLM forks an engine
core per server: stopping the process group is the only way to leave no GPU process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mpdp.launch.local import killpg

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


class VllmServers:
    def __init__(self, model: str, gpus: list[str], options: dict, log_dir: Path, *,
                 timeout: float = 300.0, command: list[str] | None = None):
        self.command = list(command or SERVER)
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.start_s: list[float] = []          # seconds from launch until each answered /health
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        extra = cli_flags(options) + quiet_flags(self.command)
        t0 = time.monotonic()
        try:
            for i, gpu in enumerate(gpus):
                port = free_port()
                cmd = [*self.command, "--model", model, "--served-model-name", "bench",
                       "--host", "127.0.0.1", "--port", str(port), *extra]
                path = log_dir / f"server{len(gpus)}_{i}.log"
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
                print(f"  starting: CUDA_VISIBLE_DEVICES={gpu} {' '.join(cmd[len(self.command):])}", flush=True)
                with open(path, "ab") as f:
                    self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                       start_new_session=True))
                self.ports.append(port)
                self.logs.append(path)
            self._wait_healthy(t0, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, t0: float, timeout: float) -> None:
        deadline = t0 + timeout
        for i, port in enumerate(self.ports):
            while not http_ok(f"http://127.0.0.1:{port}/health"):
                self._raise_if_one_exited()       # any of them: a later server's crash need not wait
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server {i} (port {port}) not healthy after {timeout:.0f} s "
                                       f"(log: {self.logs[i]})")
                time.sleep(1.0)
            self.start_s.append(time.monotonic() - t0)

    def _raise_if_one_exited(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = self.logs[i].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server {i} exited with {proc.returncode}:\n{tail}")

    def metrics(self) -> dict[str, float]:
        """Successful requests and generated tokens, summed over every server."""
        total = {"requests": 0.0, "tokens": 0.0}
        for port in self.ports:
            for key, value in scrape_metrics(port).items():
                total[key] += value
        return total

    def stop(self) -> None:
        stop_process_groups(self.procs)
        self.procs = []


def stop_process_groups(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM each process's group (started with start_new_session: a server and its engine
    cores), wait up to ``grace_s`` each, then SIGKILL the groups still there."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while its engine cores (same group) are still on their way out:
        # kill what is left and wait until the group is empty, so nothing outlives the call.
        killpg(p.pid)
        p.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.02)


def cli_flags(options: dict) -> list[str]:
    """vLLM engine options (``LLM(**options)`` keywords) as `vllm serve` flags."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        else:
            flags += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return flags


_QUIET: dict[tuple, list[str]] = {}


def quiet_flags(command: list[str]) -> list[str]:
    """The per-request logging flags this server's ``--help`` lists (they changed across vLLM
    releases): a log line per request costs the server CPU that mpdp's workers do not spend."""
    key = tuple(command)
    if key not in _QUIET:
        try:
            text = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=180).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        _QUIET[key] = [f for f in ("--disable-log-requests", "--disable-uvicorn-access-log") if f in text]
    return _QUIET[key]


def scrape_metrics(port: int) -> dict[str, float]:
    """vLLM's Prometheus counters on one server: successful requests and generation tokens."""
    totals = {"requests": 0.0, "tokens": 0.0}
    try:
        text = http_get(f"http://127.0.0.1:{port}/metrics")
    except (urllib.error.URLError, OSError):
        return totals
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name == "vllm:request_success_total":
            totals["requests"] += value
        elif name == "vllm:generation_tokens_total":
            totals["tokens"] += value
    return totals


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
