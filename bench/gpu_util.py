"""Sample each GPU's kernel-busy percentage while a block of code runs (``nvidia-smi -lms``).

    with GpuUtilization() as util:
        run_the_benchmark()
    util.summary()   # {"0": {"mean": 91.3, "median": 98.0, "samples": 57}, ...} or {} without GPUs

``utilization.gpu`` is the share of the sample period in which at least one kernel ran: a GPU fed
too slowly (by its engine's CPU side or by the client) shows it, a saturated one reads ~100.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile


class GpuUtilization:
    def __init__(self, interval_ms: int = 1000):
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen | None = None
        self._file = None
        self.samples: dict[str, list[int]] = {}

    def __enter__(self) -> "GpuUtilization":
        if shutil.which("nvidia-smi"):
            self._file = tempfile.TemporaryFile(mode="w+")
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=self._file, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._file.seek(0)
        for line in self._file:
            index, _, value = line.partition(",")
            try:
                self.samples.setdefault(index.strip(), []).append(int(value.strip()))
            except ValueError:             # "[N/A]" or a line cut short by terminate()
                pass
        self._file.close()

    def summary(self) -> dict[str, dict[str, float]]:
        return {gpu: {"mean": round(statistics.mean(v), 1), "median": float(statistics.median(v)),
                      "samples": len(v)} for gpu, v in sorted(self.samples.items()) if v}
