"""A real ``mpdp serve`` process on loopback for the server tests (no tests here, only the helper).

The server binds port 0 (a free port, no race with other runs) and says where on stderr; a
thread keeps reading its stderr so the pipe never fills. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    def __init__(self, *args: str, tmp_path=None, ready: bool = True, timeout: float = 120.0):
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("MPDP_API_KEY", None)
        if tmp_path is not None:
            tmp = tmp_path / "tmpdir"
            tmp.mkdir(exist_ok=True)
            env["TMPDIR"] = str(tmp)
        self.proc = subprocess.Popen([sys.executable, "-m", "mpdp.cli", "serve", "--port", "0", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_line(r"listening on (http://\S+)", timeout).group(1)
        self.base = self.url + "/v1"
        if ready:
            self.wait_health(200, timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; stderr:\n" + "\n".join(self.lines))

    def health(self) -> tuple[int, dict]:
        r = httpx.get(self.url + "/health", timeout=10)
        return r.status_code, r.json()

    def wait_health(self, status: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                code, body = self.health()
                if code == status:
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"/health never answered {status} within {timeout}s (last: {body})")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        gone, alive = psutil.wait_procs(kids, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"processes left behind: {[p.pid for p in alive]}"
        return code


def sum_samples(text: str, name: str, **labels) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
