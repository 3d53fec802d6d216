"""What one worker crash costs: wall time of a run with one SIGKILL mid-run against the same run clean.

One pool, several rounds in one process, alternating clean and killed: each round submits the
same requests with ``generate(..., return_exceptions=True)``; in a killed round one worker gets a
SIGKILL ``--kill-after`` seconds into the round (the worker's own process, as a crash would end
it; the supervisor then reaps its group and starts a new one). Per round: wall time until every
request resolved, how many were served / failed, and (killed rounds) the restart time, from the
SIGKILL until the slot's new worker is READY. A watcher thread polls ``stats()`` every 20 ms in
every round, clean ones too, so both kinds pay for it alike. Before a killed round the victim has
been up for at least the supervisor's STABLE_AFTER_S, so each restart is a first crash's (the
backoff of a crash loop is a different thing); victims alternate between workers 0 and 1.

CPU (issue 11's case: echo engine, 2 workers each holding 200 requests for 0.2 s, 2,000 requests;
a clean round takes ~1 s):

    python -m bench.recovery --json bench/results/recovery-2core.json

GPU (two vLLM workers sharing GPU 0 with a fixed KV cache each, 1,500 requests in flight, the
SIGKILL at 0.3 x the clean round's time unless --kill-after says; prompts of random token ids,
ignore_eos, so each request makes --max-tokens):

    python -m bench.recovery --engine vllm --model MODEL_DIR --gpus 0,0 --requests 1500 \
        --engine-options '{"load_format": "dummy", "max_model_len": 2048}' --json recovery-1gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time

import mpdp
from mpdp.core.supervisor import STABLE_AFTER_S

POLL_S = 0.02


class Watcher:
    """Polls ``stats()``; remembers when each worker (by pid) was first seen READY."""

    def __init__(self, pool: mpdp.Pool):
        self.pool = pool
        self.ready_since: dict[int, tuple[int, float]] = {}   # slot index -> (pid, first seen ready)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.poll()
        self._thread = threading.Thread(target=self._run, name="recovery-watcher", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        now = time.monotonic()
        for w in self.pool.stats()["workers"]:
            with self._lock:
                seen = self.ready_since.get(w["index"])
                if w["state"] == "ready" and w["pid"] and (seen is None or seen[0] != w["pid"]):
                    self.ready_since[w["index"]] = (w["pid"], now)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def ready(self, index: int) -> tuple[int, float] | None:
        with self._lock:
            return self.ready_since.get(index)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def make_items(args) -> list:
    if args.engine == "echo":
        return [f"recovery request {i}" for i in range(args.requests)]
    rng = random.Random(args.seed)
    return [{"prompt_token_ids": [rng.randrange(100, args.vocab) for _ in range(args.prompt_len)]}
            for _ in range(args.requests)]


def check(items, results, engine: str) -> tuple[int, int, int, str | None]:
    """(served, failed, wrong, first error); the echo engine's answer must be its prompt."""
    served = failed = wrong = 0
    first = None
    for item, r in zip(items, results):
        if isinstance(r, BaseException):
            failed += 1
            first = first or repr(r)
        else:
            served += 1
            if engine == "echo" and r.text != item[:64]:
                wrong += 1
    return served, failed, wrong, first


def one_round(pool, watcher: Watcher, items, sampling: dict, args, victim: int | None,
              kill_after: float = 0.0) -> dict:
    killed: dict = {}
    if victim is not None:                       # a first crash, not a crash loop (see the docstring)
        pid, since = watcher.ready(victim)
        time.sleep(max(0.0, since + args.settle_s - time.monotonic()))

    def killer(t0: float) -> None:
        time.sleep(max(0.0, t0 + kill_after - time.monotonic()))
        pid, _ = watcher.ready(victim)
        stats = pool.stats()["workers"][victim]
        killed.update(worker=victim, pid=pid, in_flight=stats.get("in_flight"), at=time.monotonic())
        os.kill(pid, signal.SIGKILL)

    t0 = time.monotonic()
    if victim is not None:
        th = threading.Thread(target=killer, args=(t0,), daemon=True)
        th.start()
    results = pool.generate(items, return_exceptions=True, **sampling)
    wall = time.monotonic() - t0
    served, failed, wrong, first = check(items, results, args.engine)
    row = {"kind": "clean" if victim is None else "killed", "wall_s": wall, "requests": len(items),
           "served": served, "failed": failed, "wrong": wrong, "first_error": first}
    if victim is not None:
        th.join()
        deadline = time.monotonic() + args.restart_timeout
        while time.monotonic() < deadline:        # the new worker READY (it may be after the run ended)
            seen = watcher.ready(victim)
            if seen and seen[0] != killed["pid"]:
                break
            time.sleep(POLL_S)
        seen = watcher.ready(victim)
        restarted = seen is not None and seen[0] != killed["pid"]
        row.update(victim=victim, killed_pid_in_flight=killed["in_flight"], kill_at_s=killed["at"] - t0,
                   restart_s=(seen[1] - killed["at"]) if restarted else None,
                   killed_after_the_round=killed["at"] - t0 > wall)
    return row


def summary(rows: list[dict]) -> dict:
    clean = [r["wall_s"] for r in rows if r["kind"] == "clean"]
    killed = [r["wall_s"] for r in rows if r["kind"] == "killed"]
    restarts = [r["restart_s"] for r in rows if r.get("restart_s") is not None]

    def spread(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None

    out = {"clean_wall_s": spread(clean), "killed_wall_s": spread(killed), "restart_s": spread(restarts),
           "requests": sum(r["requests"] for r in rows), "served": sum(r["served"] for r in rows),
           "failed": sum(r["failed"] for r in rows), "wrong": sum(r["wrong"] for r in rows)}
    out["all_served"] = out["served"] == out["requests"] and out["wrong"] == 0
    if clean and killed:
        out["extra_s_median"] = statistics.median(killed) - statistics.median(clean)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("echo", "vllm"), default="echo")
    p.add_argument("--model", default="echo", help="the vLLM model folder (--engine vllm)")
    p.add_argument("--workers", type=int, default=2, help="echo workers")
    p.add_argument("--gpus", default="0,0", help="vLLM: visible-GPU indices, one worker each (0,0: two on GPU 0)")
    p.add_argument("--requests", type=int, default=None, help="per round (echo 2,000, vllm 1,500)")
    p.add_argument("--rounds", type=int, default=None, help="pairs of clean + killed rounds (echo 5, vllm 2)")
    p.add_argument("--kill-after", type=float, default=None,
                   help="seconds into the round (echo 0.3; vllm: 0.3 x the clean round before it)")
    p.add_argument("--delay-s", type=float, default=0.2, help="echo: each request held this long")
    p.add_argument("--capacity", type=int, default=200, help="echo: requests a worker holds at once")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=8 << 30,
                   help="vLLM: each worker's KV cache, fixed (both share one GPU)")
    p.add_argument("--engine-options", default="{}", help="vLLM: JSON of more engine options")
    p.add_argument("--max-tokens", type=int, default=256, help="vLLM: tokens each request makes")
    p.add_argument("--prompt-len", type=int, default=128, help="vLLM: random prompt token ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=STABLE_AFTER_S + 0.5,
                   help="a victim has been READY this long before its SIGKILL (0: no wait)")
    p.add_argument("--restart-timeout", type=float, default=None, help="wait this long for the new worker")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gpu = args.engine == "vllm"
    args.requests = args.requests or (1500 if gpu else 2000)
    args.rounds = args.rounds or (2 if gpu else 5)
    if args.kill_after is None and not gpu:
        args.kill_after = 0.3
    args.restart_timeout = args.restart_timeout or (600.0 if gpu else 30.0)
    return args


def make_pool(args) -> tuple[mpdp.Pool, dict]:
    if args.engine == "echo":
        pool = mpdp.Pool(engine="echo", num_workers=args.workers,
                         engine_options={"delay_s": args.delay_s, "capacity": args.capacity})
        return pool, {"max_tokens": 64}
    options = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes, **json.loads(args.engine_options)}
    with open(os.path.join(args.model, "config.json")) as f:
        args.vocab = int(json.load(f)["vocab_size"])
    pool = mpdp.Pool(model=args.model, engine="vllm", gpus=[int(g) for g in args.gpus.split(",")],
                     engine_options=options, worker_logs="inherit")
    return pool, {"max_tokens": args.max_tokens, "temperature": 0.6, "top_p": 0.95, "ignore_eos": True}


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    pool, sampling = make_pool(args)
    start_s = time.monotonic() - t0
    rows = []
    try:
        watcher = Watcher(pool)
        items = make_items(args)
        pool.generate(items[:max(1, len(items) // 10)], return_exceptions=True, **sampling)   # warm-up
        workers = len(pool.stats()["workers"])
        for i in range(args.rounds):
            for victim in (None, i % workers):
                kill_after = args.kill_after
                if victim is not None and kill_after is None:      # vllm: 0.3 x the clean round just run
                    kill_after = 0.3 * rows[-1]["wall_s"]
                row = one_round(pool, watcher, items, sampling, args, victim, kill_after)
                rows.append(row)
                extra = f", victim {victim} ({row['killed_pid_in_flight']} in flight), restart " \
                        f"{row['restart_s']:.2f} s" if victim is not None and row["restart_s"] else ""
                late = " (the SIGKILL came after the round ended: raise --requests)" \
                    if row.get("killed_after_the_round") else ""
                print(f"round {i + 1} {row['kind']:>6}: {row['wall_s']:.2f} s, served {row['served']}/"
                      f"{row['requests']}, failed {row['failed']}{extra}{late}", flush=True)
        watcher.close()
        workers_stats = [{k: w.get(k) for k in ("index", "restarts", "kv_cache_tokens", "capacity")}
                         for w in pool.stats()["workers"]]
    finally:
        pool.close()
    s = summary(rows)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "command": " ".join(["python -m bench.recovery"] + sys.argv[1:]),
              "engine": args.engine, "model": os.path.basename(os.path.normpath(args.model)),
              "requests_per_round": args.requests, "kill_after_s": args.kill_after or "0.3 x the clean round",
              "pool_start_s": start_s,
              "engine_options": ({"delay_s": args.delay_s, "capacity": args.capacity} if args.engine == "echo"
                                 else {"kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                                       **json.loads(args.engine_options)}),
              "workers": workers_stats, "summary": s, "rounds": rows}
    c, k, r = s["clean_wall_s"], s["killed_wall_s"], s["restart_s"]
    print(f"clean {c['median']:.2f} s ({c['min']:.2f}-{c['max']:.2f}), one SIGKILL {k['median']:.2f} s "
          f"({k['min']:.2f}-{k['max']:.2f}): +{s['extra_s_median']:.2f} s; restart "
          + (f"{r['median']:.2f} s ({r['min']:.2f}-{r['max']:.2f})" if r else "not seen")
          + f"; served {s['served']}/{s['requests']}, failed {s['failed']}, wrong {s['wrong']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if s["all_served"] else 1


if __name__ == "__main__":
    sys.exit(main())
