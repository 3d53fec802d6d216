"""Soak: minutes of mixed load through the echo engine while workers are SIGKILLed now and then.

Every answer is checked against what the echo engine must say (the prompt, or the last chat
message, cut to max_tokens and at the first stop string, once per choice). Every request is
accounted for: served + cancelled + timed out + failed == submitted, and ``lost`` (submitted,
never resolved within 60 s) must be 0. Memory: resident set size of the parent and of each
worker at the start (after a warm-up) and at the end, sampled every 30 s in between.

The load, all at once: 16 threads each submitting one request and waiting for it; 4 threads of
chat requests with n=2 and a stop string; 2 threads of generate() batches of 200; 1 thread
streaming imap() over 2,000 prompts at a time; 2 threads that cancel what they submit at once
(racing the answer); 1 thread whose requests have a 1 ms timeout (racing too); 1 thread of bad
input that must be refused at submit. A killer SIGKILLs a random ready worker every
``--kill-every`` seconds (jittered).

    python -m bench.soak --minutes 10 --json bench/results/soak-2core.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout

import psutil

import mpdp

RESULT_WAIT_S = 60.0         # a request not resolved this long after the load stops counts as lost


def expected(text: str, max_tokens: int, stop: str | None = None) -> str:
    out = text[:max_tokens]
    if stop and stop in out:
        out = out[:out.index(stop)]
    return out


class Tally:
    """Counts, under one lock, from every client thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.wrong: list[str] = []
        self.lost: list[int] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def outcome(self, future, want: list[str] | str | None, kind: str) -> None:
        """Wait for one future and file it: served (checked), cancelled, timed_out, failed, lost."""
        try:
            c = future.result(timeout=RESULT_WAIT_S)
        except CancelledError:
            self.add("cancelled")
        except mpdp.RequestTimeout:
            self.add("timed_out")
        except FutureTimeout:
            with self.lock:
                self.counts["lost"] += 1
                self.lost.append(getattr(future, "request_id", -1))
        except mpdp.MpdpError as exc:
            self.add(f"failed:{type(exc).__name__}")
        else:
            got = c.choices if isinstance(want, list) else c.text
            if got == want:
                self.add("served")
                self.add(f"served:{kind}")
            else:
                with self.lock:
                    self.counts["wrong"] += 1
                    if len(self.wrong) < 20:
                        self.wrong.append(f"{kind}: wanted {want!r}, got {got!r}")


def memory(pool) -> dict:
    me = psutil.Process()
    workers = {}
    for w in pool.stats()["workers"]:
        try:
            workers[w["index"]] = psutil.Process(w["pid"]).memory_info().rss
        except (psutil.NoSuchProcess, TypeError):
            workers[w["index"]] = None
    return {"t": time.time(), "parent_rss": me.memory_info().rss, "parent_fds": me.num_fds(),
            "parent_threads": me.num_threads(), "worker_rss": workers}


def run(args) -> dict:
    tally = Tally()
    stop = threading.Event()
    kills: list[dict] = []
    pool = mpdp.Pool(engine="echo", num_workers=args.workers, max_pending=args.max_pending,
                     heartbeat_interval=0.2, heartbeat_timeout=2.0,
                     engine_options={"delay_s": args.delay})

    def single(t):
        rng = random.Random(t)
        i = 0
        while not stop.is_set():
            prompt, mt = f"single {t}-{i} " + "x" * rng.randrange(0, 40), rng.randrange(1, 64)
            tally.add("submitted")
            tally.outcome(pool.submit(prompt, max_tokens=mt), expected(prompt, mt), "single")
            i += 1

    def chat(t):
        i = 0
        while not stop.is_set():
            content = f"chat {t}-{i} | after the stop"
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
            tally.add("submitted")
            tally.outcome(pool.submit(messages=messages, n=2, stop="|", max_tokens=64),
                          [expected(content, 64, "|")] * 2, "chat")
            i += 1

    def file_item(prompt, c, kind):
        if isinstance(c, Exception):
            tally.add(f"failed:{type(c).__name__}")
        elif c.text == prompt:
            tally.add("served")
            tally.add(f"served:{kind}")
        else:
            tally.add("wrong")

    def batch(t):
        i = 0
        while not stop.is_set():
            prompts = [f"batch {t}-{i}-{j}" for j in range(200)]
            tally.add("submitted", len(prompts))
            for p, c in zip(prompts, pool.generate(prompts, max_tokens=64, return_exceptions=True)):
                file_item(p, c, "batch")
            i += 1

    def stream(t):
        i = 0
        while not stop.is_set():
            prompts = [f"imap {t}-{i}-{j}" for j in range(2000)]
            tally.add("submitted", len(prompts))
            got = 0
            for p, c in zip(prompts, pool.imap(iter(prompts), window=64, max_tokens=64, return_exceptions=True)):
                got += 1
                file_item(p, c, "imap")
            if got != len(prompts):
                tally.add("lost", len(prompts) - got)
            i += 1

    def canceller(t):
        i = 0
        while not stop.is_set():
            prompt = f"cancel {t}-{i}"
            tally.add("submitted")
            f = pool.submit(prompt, max_tokens=64)
            f.cancel()                   # races the answer: either outcome is fine, nothing else is
            tally.outcome(f, prompt, "cancel")
            i += 1

    def deadline(t):
        i = 0
        while not stop.is_set():
            prompt = f"timeout {t}-{i}"
            tally.add("submitted")
            tally.outcome(pool.submit(prompt, max_tokens=64, timeout=0.001), prompt, "timeout")
            i += 1

    bad_inputs = [dict(prompt=""), dict(prompt=7), dict(prompt="x", max_tokens=0), dict(prompt="x", top_p=2.0),
                  dict(messages=[{"role": "wizard", "content": "x"}]), dict(prompt="\ud800"),
                  dict(prompt="x", nonsense=True)]

    def bad(t):
        i = 0
        while not stop.wait(0.01):
            try:
                pool.submit(**bad_inputs[i % len(bad_inputs)])
                tally.add("bad_accepted")
            except (ValueError, TypeError):
                tally.add("bad_refused")
            i += 1

    def killer():
        rng = random.Random(args.seed)
        while not stop.wait(rng.uniform(0.5, 1.5) * args.kill_every):
            ready = [w for w in pool.stats()["workers"] if w["state"] == "ready"]
            if ready:
                w = rng.choice(ready)
                try:
                    os.kill(w["pid"], signal.SIGKILL)
                    kills.append({"t": time.time(), "worker": w["index"], "pid": w["pid"]})
                except ProcessLookupError:
                    pass

    # Warm up, then measure memory at the start.
    assert [c.text for c in pool.generate([f"warm {i}" for i in range(2000)])] == [f"warm {i}" for i in range(2000)]
    start_mem = memory(pool)
    samples = [start_mem]
    roles = ([(single, 16), (chat, 4), (batch, 2), (stream, 1), (canceller, 2), (deadline, 1), (bad, 1)])
    threads = [threading.Thread(target=fn, args=(t,), name=f"{fn.__name__}-{t}", daemon=True)
               for fn, n in roles for t in range(n)]
    threads.append(threading.Thread(target=killer, name="killer", daemon=True))
    t0 = time.monotonic()
    for th in threads:
        th.start()
    end = t0 + args.minutes * 60
    last_print = t0
    while (now := time.monotonic()) < end:
        time.sleep(min(30.0, end - now))
        samples.append(memory(pool))
        if time.monotonic() - last_print >= 60 or time.monotonic() >= end:
            last_print = time.monotonic()
            c = tally.counts
            print(f"  {(last_print - t0) / 60:5.1f} min: served {c['served']:,}, kills {len(kills)}, "
                  f"lost {c['lost']}, wrong {c['wrong']}, parent RSS {samples[-1]['parent_rss'] / 2**20:.1f} MiB",
                  flush=True)
    stop.set()
    for th in threads:
        th.join(RESULT_WAIT_S + 30)
    elapsed = time.monotonic() - t0
    stuck = [th.name for th in threads if th.is_alive()]
    time.sleep(1.0)                         # let the last kill's restart settle before measuring
    end_mem = memory(pool)
    stats = pool.stats()
    pool.close()

    c = dict(tally.counts)
    resolved = sum(v for k, v in c.items() if k in ("served", "cancelled", "timed_out", "wrong", "lost")
                   or k.startswith("failed:"))
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "settings": vars(args),
        "elapsed_s": elapsed,
        "counts": c,
        "accounted": resolved == c.get("submitted", 0),
        "served_per_s": c.get("served", 0) / elapsed,
        "kills": len(kills),
        "restarts": sum(w["restarts"] for w in stats["workers"]),
        "pool": {k: v for k, v in stats.items() if k != "workers"},
        "lost_ids": tally.lost[:100],
        "wrong_examples": tally.wrong,
        "stuck_threads": stuck,
        "memory_start": start_mem,
        "memory_end": end_mem,
        "memory_samples": samples,
    }


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def table(r: dict) -> str:
    c = r["counts"]
    s, e = r["memory_start"], r["memory_end"]
    rows = [
        ("date", r["date"]),
        ("machine", f"{r['machine']['cpus']}-core CPU, {r['machine']['platform']}, Python {r['machine']['python']}"),
        ("duration", f"{r['elapsed_s'] / 60:.1f} min, {r['settings']['workers']} echo workers, "
                     f"a SIGKILL every ~{r['settings']['kill_every']:g} s"),
        ("requests submitted", f"{c.get('submitted', 0):,}"),
        ("requests served (checked)", f"{c.get('served', 0):,}  ({r['served_per_s']:,.0f}/s)"),
        ("  of which single / chat / batch / imap",
         " / ".join(f"{c.get('served:' + k, 0):,}" for k in ("single", "chat", "batch", "imap"))),
        ("cancelled / timed out", f"{c.get('cancelled', 0):,} / {c.get('timed_out', 0):,}"),
        ("failed", ", ".join(f"{k[7:]} {v}" for k, v in c.items() if k.startswith("failed:")) or "0"),
        ("bad input refused at submit", f"{c.get('bad_refused', 0):,} (accepted: {c.get('bad_accepted', 0)})"),
        ("wrong answers", f"{c.get('wrong', 0)}"),
        ("LOST", f"{c.get('lost', 0)}"),
        ("every request accounted for", str(r["accounted"])),
        ("SIGKILLs / restarts", f"{r['kills']} / {r['restarts']}"),
        ("dropped frames", f"{r['pool']['dropped_frames']}"),
        ("parent RSS start → end", f"{mib(s['parent_rss'])} → {mib(e['parent_rss'])} MiB"),
        ("parent fds / threads start → end", f"{s['parent_fds']} / {s['parent_threads']} → "
                                             f"{e['parent_fds']} / {e['parent_threads']}"),
        ("worker RSS start → end (MiB)", ", ".join(f"w{i}: {mib(s['worker_rss'].get(i))} → {mib(e['worker_rss'].get(i))}"
                                                   for i in sorted(s["worker_rss"]))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs (jittered ±50%%)")
    ap.add_argument("--delay", type=float, default=0.002, help="echo engine delay_s: time a request stays in flight")
    ap.add_argument("--max-pending", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the full result here")
    args = ap.parse_args(argv)
    print(f"soak: {args.minutes:g} min of mixed load, {args.workers} echo workers, "
          f"a SIGKILL every ~{args.kill_every:g} s", flush=True)
    result = run(args)
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    ok = result["counts"].get("lost", 0) == 0 and result["counts"].get("wrong", 0) == 0 and result["accounted"] \
        and not result["stuck_threads"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
