"""`mpdp generate` on big inputs with the echo engine: wall time, requests/s and peak RSS.

Writes an N-line simple-format input, runs the real command line (``mpdp.cli.main``) in a child
process, and reads that process's own peak RSS from ``getrusage`` (the workers are counted
apart: their peak is the largest worker's). Run at two sizes to see that the job's memory does
not grow with the input (the reorder window, not the file, bounds it; ids cost 8 bytes each).

    python -m bench.batch_scale --lines 100000,1000000 --json bench/results/batch-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child: the command line itself, then its own and its workers' peak RSS (KiB on Linux).
CHILD = """
import json, resource, sys
from mpdp.cli import main
code = main(sys.argv[2:])
usage = {"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
         "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "exit": code}
open(sys.argv[1], "w").write(json.dumps(usage))
"""


def write_input(path: str, lines: int) -> int:
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f'{{"id": "req-{i:08d}", "prompt": "Summarise item {i} of the batch in one line.", '
                    f'"metadata": {{"shard": {i % 16}}}}}\n')
    return os.path.getsize(path)


def run_one(lines: int, workers: int, folder: str, window: int) -> dict:
    src, out, usage = (os.path.join(folder, name) for name in ("in.jsonl", "out.jsonl", "usage.json"))
    size = write_input(src, lines)
    argv = ["generate", "--input", src, "--output", out, "--overwrite", "--engine", "echo",
            "--num-workers", str(workers), "--max-tokens", "64", "--window", str(window), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, usage, *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mpdp generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = json.loads(open(usage).read())
    with open(out, "rb") as f:
        written = sum(1 for _ in f)
    if written != lines:
        raise SystemExit(f"expected {lines} output lines, found {written}")
    # The job's own clock (from the pool being ready to the last line written): "wrote N results ... in Xs".
    job = re.search(r"wrote (\d+) results \((\d+) failed\) in ([\d.]+)s", proc.stderr)
    job_s = float(job.group(3)) if job else None
    os.remove(src)
    os.remove(out)
    return {"lines": lines, "input_mb": round(size / 1e6, 1), "workers": workers, "window": window,
            "wall_s": round(wall, 1), "job_s": job_s,
            "requests_per_s_wall": round(lines / wall), "requests_per_s_job": round(lines / job_s) if job_s else None,
            "peak_rss_mib": round(rss["self_kib"] / 1024, 1),
            "worker_peak_rss_mib": round(rss["children_kib"] / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", default="100000,1000000", help="input sizes, comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpdp-bench-") as folder:
        for n in (int(x) for x in args.lines.split(",")):
            row = run_one(n, args.workers, folder, args.window)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"bench": "batch_scale", "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
