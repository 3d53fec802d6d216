"""How output throughput scales with GPUs: bare vLLM, the seed's shards, mpdp, the DSPy pattern, servers.

One run, one machine, every variant on the same requests:

    python -m bench.scaling --gpus 4 --json out/scaling.json
    python -m bench.scaling --variants bare,mpdp1,mpdp2,mpdp4,shard4,dspy4,serve4 --profiles fixed,heavy

Workload: the Qwen3-8B-shaped model with random weights (load_format="dummy"), prompts of 256
random token ids (fixed seed), temperature 0.6, top_p 0.95, ignore_eos, so every request
generates exactly its max_tokens. Profiles: ``fixed`` (1024 output tokens each) and ``heavy``
(lognormal, median 300, clipped at 4096). A variant on k GPUs serves the first
k x --requests-per-gpu requests of the profile's list.

Variants (k = GPUs; a name without k means --gpus):
  bare       vllm.LLM.generate on one GPU, in a process of its own (the baseline)
  shard<k>   the seed's strategy: the requests cut into k contiguous shards, one process and
             LLM.generate per GPU; the engines load first, then all start together (barrier);
             makespan = the slowest shard
  mpdp<k>    mpdp.Pool(engine="vllm", num_gpus=k).generate(all requests)
  dspy<k>    the DSPy pattern on the same pool: --threads threads, each submit() then wait
  serve<k>   one OpenAI api_server per GPU, --threads HTTP clients round robin (slow to start)
A suffix picks profiles for one variant: ``dspy4:heavy``, ``mpdp2:fixed+heavy``.

Engines are started in waves, each wave's engines together, then measured one variant at a
time (never two measurements at once): the LLM processes (bare and every shard<k> reuse them),
then the pools (pools of different sizes that fit side by side start together, on disjoint
GPUs), then the servers. Every engine gets a small warm-up before any timing. A time budget
(--budget-s) skips what would not finish in time, and says so; results are written to the
JSON after every measurement, so a cut run still leaves them.

The parent process never imports torch or vLLM: engines live in child processes ("hosts").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.vllm_servers import VllmServers
from mpdp.launch.local import killpg, visible_gpus

SAMPLING = {"temperature": 0.6, "top_p": 0.95, "ignore_eos": True}
WARMUP_REQUESTS_PER_GPU = 16


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the requests -------------------------------------------------------------------------------
def make_requests(profile: str, count: int, args) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) pairs; the same seed gives the same list on every run."""
    rng = random.Random(f"{args.seed}:{profile}")
    vocab = args.vocab_size
    out = []
    for _ in range(count):
        ids = [rng.randrange(100, vocab) for _ in range(args.prompt_len)]
        if profile == "fixed":
            m = args.fixed_len
        elif profile == "heavy":
            m = int(round(rng.lognormvariate(math.log(args.heavy_median), args.heavy_sigma)))
            m = max(1, min(args.heavy_cap, m))
        else:
            raise ValueError(f"unknown profile {profile!r}")
        out.append((ids, m))
    return out


def tiny_requests(n: int) -> list[tuple[list[int], int]]:
    return [([1000 + i, 2000 + i, 3000 + i, 4000 + i] * 4, 16) for i in range(n)]


# -- engine hosts: one child process holding an LLM or an mpdp pool -------------------------------
class LLMRunner:
    """vllm.LLM on this process's GPU(s), as a user of the seed runs it."""

    def __init__(self, spec: dict):
        import vllm
        from vllm import LLM

        self.version, self.gpus = vllm.__version__, spec["gpus"]
        self.llm = LLM(model=spec["model"], **spec["engine_options"])

    def prepare(self, requests, sampling, mode, threads) -> None:
        from vllm import SamplingParams, TokensPrompt

        self.job = ([TokensPrompt(prompt_token_ids=ids) for ids, _ in requests],
                    [SamplingParams(max_tokens=m, **sampling) for _, m in requests])

    def go(self) -> dict:
        prompts, params = self.job
        t0, w0 = time.perf_counter(), time.time()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        duration = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        reasons = Counter(c.finish_reason for o in outs for c in o.outputs)
        return {"t_start": w0, "duration_s": duration, "requests": len(outs), "output_tokens": tokens,
                "finish_reasons": dict(reasons), "errors": 0,
                "per_gpu": [{"gpus": self.gpus, "busy_s": duration, "tokens": tokens, "requests": len(outs)}]}

    def info(self) -> dict:
        cfg = self.llm.llm_engine.vllm_config
        return {"vllm": self.version, "max_num_seqs": cfg.scheduler_config.max_num_seqs,
                "kv_cache_tokens": (cfg.cache_config.num_gpu_blocks or 0) * (cfg.cache_config.block_size or 0)}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


class PoolRunner:
    """mpdp.Pool over this process's GPUs (CUDA_VISIBLE_DEVICES is the pool's whole world)."""

    def __init__(self, spec: dict):
        import mpdp

        self.pool = mpdp.Pool(model=spec["model"], engine="vllm", num_gpus=len(spec["gpus"]),
                              engine_options=spec["engine_options"], worker_logs="inherit")

    def prepare(self, requests, sampling, mode, threads) -> None:
        self.job = ([{"prompt_token_ids": ids, "max_tokens": m} for ids, m in requests], sampling, mode, threads)

    def go(self) -> dict:
        items, sampling, mode, threads = self.job
        before = {w["index"]: w for w in self.pool.stats()["workers"]}
        t0, w0 = time.monotonic(), time.time()
        if mode == "generate":
            comps = self.pool.generate(items, return_exceptions=True, **sampling)
        else:                                                 # dspy: N threads, one request at a time each
            def one(item):
                try:
                    return self.pool.submit(**item, **sampling).result()
                except Exception as exc:                      # counted, not fatal
                    return exc
            with ThreadPoolExecutor(max_workers=threads) as ex:
                comps = list(ex.map(one, items))
        duration = time.monotonic() - t0
        after = self.pool.stats()["workers"]                  # last_result: time.monotonic() of this process
        done = [c for c in comps if not isinstance(c, BaseException)]
        errors = [c for c in comps if isinstance(c, BaseException)]
        per_gpu = []
        for w in after:
            mine = [c for c in done if c.worker == w["index"]]
            last = w.get("last_result")
            busy = (last - t0) if last is not None and last > t0 else 0.0
            per_gpu.append({"worker": w["index"], "gpus": w.get("gpus"), "busy_s": min(busy, duration),
                            "tokens": sum(c.completion_tokens for c in mine), "requests": len(mine),
                            "capacity": w.get("capacity"),
                            "restarts": w.get("restarts", 0) - before.get(w["index"], {}).get("restarts", 0)})
        return {"t_start": w0, "duration_s": duration, "requests": len(comps),
                "output_tokens": sum(c.completion_tokens for c in done),
                "finish_reasons": dict(Counter(r for c in done for r in c.finish_reasons)),
                "errors": len(errors), "first_error": repr(errors[0]) if errors else None, "per_gpu": per_gpu}

    def info(self) -> dict:
        return {"workers": [{k: w.get(k) for k in ("index", "gpus", "capacity", "max_model_len")}
                            for w in self.pool.stats()["workers"]]}

    def close(self) -> None:
        self.pool.close()


RUNNERS = {"llm": LLMRunner, "pool": PoolRunner}


def runner_class(kind: str):
    """A runner by name, or "module:Class" for a runner another benchmark defines."""
    if ":" not in kind:
        return RUNNERS[kind]
    import importlib

    module, name = kind.split(":")
    return getattr(importlib.import_module(module), name)


def host_main(conn, spec: dict) -> None:
    """A child process: build the engine, warm it up, then serve prepare/go/stop from the parent."""
    os.setsid()                                   # the parent can kill this host and its engines as one group
    fd = os.open(spec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec["gpus"])   # before torch or vLLM load
    try:
        t0 = time.perf_counter()
        runner = runner_class(spec["kind"])(spec)
        start_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        runner.prepare(tiny_requests(WARMUP_REQUESTS_PER_GPU * len(spec["gpus"])), SAMPLING, "generate", 1)
        runner.go()
        conn.send({"ok": True, "start_s": start_s, "warmup_s": time.perf_counter() - t1, "info": runner.info()})
        while True:
            msg = conn.recv()
            if msg["op"] == "prepare":              # build the inputs outside the timing
                runner.prepare(msg["requests"], msg["sampling"], msg["mode"], msg["threads"])
                conn.send({"ok": True})
            elif msg["op"] == "go":                 # sent to every host of a run back to back: the barrier
                conn.send({"ok": True, **runner.go()})
            elif msg["op"] == "stop":
                runner.close()
                conn.send({"ok": True})
                return
    except BaseException:
        traceback.print_exc()
        try:
            conn.send({"ok": False, "error": traceback.format_exc()[-4000:]})
        except Exception:
            pass


class Host:
    """The parent's handle on one host process."""

    def __init__(self, name: str, kind: str, gpus: list[str], args, log_dir: Path, extra: dict | None = None):
        self.name, self.kind, self.gpus = name, kind, gpus
        self.log_path = log_dir / f"{name}.log"
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        spec = {"kind": kind, "gpus": gpus, "model": args.model, "engine_options": args.engine_options,
                "log_path": str(self.log_path), **(extra or {})}
        # Not daemonic: vLLM and mpdp start processes of their own.
        self.proc = ctx.Process(target=host_main, args=(child, spec), name=f"bench-{name}", daemon=False)
        self.proc.start()
        self.ready: dict | None = None

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"host {self.name} died (exit {self.proc.exitcode}); log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"host {self.name} did not answer in {timeout:.0f}s; log tail:\n{self.log_tail()}")
        msg = self.conn.recv()
        if not msg.get("ok"):
            raise RuntimeError(f"host {self.name} failed:\n{msg.get('error')}")
        return msg

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 90.0) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"op": "stop"})
                self.recv(timeout)
            except Exception as exc:
                log(f"host {self.name}: clean stop failed ({type(exc).__name__}); killing it")
        self.proc.join(15)
        killpg(self.proc.pid)                             # whatever is left of its group (engine cores)
        self.proc.join(5)


def start_hosts(hosts: list[Host], timeout: float) -> None:
    """Wait until every host of a wave is ready (they load side by side)."""
    for h in hosts:
        h.ready = h.recv(timeout)
        log(f"  {h.name} ready: start {h.ready['start_s']:.1f}s, warm-up {h.ready['warmup_s']:.1f}s, "
            f"{h.ready['info']}")


def run_on_hosts(parts: list[tuple[Host, list]], mode: str, args, timeout: float) -> list[dict]:
    """Prepare every host, then start them together (a barrier), then collect."""
    for h, reqs in parts:
        h.conn.send({"op": "prepare", "requests": reqs, "sampling": SAMPLING, "mode": mode, "threads": args.threads})
    for h, _ in parts:
        h.recv(120)
    for h, _ in parts:
        h.conn.send({"op": "go"})
    return [h.recv(timeout) for h, _ in parts]


# -- OpenAI servers ---------------------------------------------------------------------------------
class Servers(VllmServers):
    """One OpenAI api_server per GPU (bench/vllm_servers.py), driven over HTTP /v1/completions."""

    def __init__(self, gpus: list[str], args, log_dir: Path):
        super().__init__(args.model, gpus, args.engine_options, log_dir, timeout=args.serve_timeout)
        try:
            for port in self.ports:                           # warm-up, as the other variants get
                for ids, m in tiny_requests(4):
                    _complete(port, ids, m)
        except BaseException:
            self.stop()
            raise

    def run(self, requests, threads: int) -> dict:
        k = len(self.ports)
        finished = [0.0] * k
        tokens, counts, errors = [0] * k, [0] * k, []
        lock = threading.Lock()
        t0, w0 = time.monotonic(), time.time()

        def one(i_req):
            i, (ids, m) = i_req
            s = i % k                                         # round robin
            try:
                usage = _complete(self.ports[s], ids, m)["usage"]
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))
                return
            with lock:
                tokens[s] += usage["completion_tokens"]
                counts[s] += 1
                finished[s] = time.monotonic() - t0

        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(one, enumerate(requests)))
        duration = time.monotonic() - t0
        return {"t_start": w0, "duration_s": duration, "requests": len(requests), "output_tokens": sum(tokens),
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "per_gpu": [{"server": s, "busy_s": finished[s], "tokens": tokens[s], "requests": counts[s]}
                            for s in range(k)]}


def _complete(port: int, ids: list[int], max_tokens: int) -> dict:
    body = json.dumps({"model": "bench", "prompt": ids, "max_tokens": max_tokens, **SAMPLING}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.load(r)


# -- planning ---------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str            # bare, shard4, mpdp2, dspy4, serve4
    kind: str            # bare | shard | mpdp | dspy | serve
    k: int               # GPUs
    profiles: list[str]


def parse_variants(text: str, n_gpus: int, profiles: list[str]) -> list[Variant]:
    out, seen = [], set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, prof = part.partition(":")
        m = re.fullmatch(r"(bare|shard|mpdp|dspy|serve)(\d*)", name)
        if not m:
            raise SystemExit(f"unknown variant {part!r}")
        kind = m.group(1)
        k = 1 if kind == "bare" else int(m.group(2) or n_gpus)
        if k > n_gpus or k < 1:
            log(f"skipping {part}: needs {k} GPUs, {n_gpus} available")
            continue
        profs = [p for p in (prof.split("+") if prof else profiles)]
        for p in profs:
            if p not in ("fixed", "heavy"):
                raise SystemExit(f"unknown profile {p!r} in {part!r}")
        key = f"{kind}{k}"
        if key in seen:
            continue
        seen.add(key)
        out.append(Variant("bare" if kind == "bare" else key, kind, k, profs))
    return out


def pool_waves(sizes: list[int], n_gpus: int) -> list[list[int]]:
    """Pools that fit side by side on the GPUs start together: first fit, largest first."""
    waves: list[list[int]] = []
    for size in sorted(set(sizes), reverse=True):
        for w in waves:
            if sum(w) + size <= n_gpus:
                w.append(size)
                break
        else:
            waves.append([size])
    return waves


@dataclass
class Budget:
    total_s: float
    t0: float = field(default_factory=time.monotonic)
    starts: dict = field(default_factory=dict)       # compile cache state -> slowest engine start seen
    run_s: dict = field(default_factory=dict)        # profile -> longest measurement so far

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def est_start(self, cache: str) -> float:
        if cache in self.starts:
            return 1.2 * self.starts[cache] + 10
        if cache == "warm" and "cold" in self.starts:   # the compile cache saves ~45% (114 s -> 63 s seen)
            return 0.7 * self.starts["cold"] + 10
        return 150.0 if cache != "warm" else 110.0

    def est_run(self, profile: str, kind: str) -> float:
        base = self.run_s.get(profile, 60.0) * 1.25
        return base * (1.6 if kind in ("dspy", "serve") else 1.0)

    def saw_start(self, cache: str, s: float) -> None:
        self.starts[cache] = max(self.starts.get(cache, 0.0), s)

    def saw_run(self, profile: str, s: float, kind: str) -> None:
        if kind not in ("dspy", "serve"):
            self.run_s[profile] = max(self.run_s.get(profile, 0.0), s)


# -- the benchmark ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.gpus = visible_gpus()[:args.gpus]
        self.out = Path(args.json)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.out.parent / (self.out.stem + "-logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(args.budget_s)
        self.variants = parse_variants(args.variants, len(self.gpus), args.profiles)
        max_k = max([v.k for v in self.variants] or [1])
        self.requests = {p: make_requests(p, max_k * args.requests_per_gpu, args) for p in args.profiles
                         if any(p in v.profiles for v in self.variants)}
        self.data = {"meta": self._meta(), "starts": [], "results": [], "skipped": []}

    # -- bookkeeping ------------------------------------------------------------------------------
    def _meta(self) -> dict:
        a = self.args
        expected = {p: sum(m for _, m in reqs[:a.requests_per_gpu]) for p, reqs in self.requests.items()}
        return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
                "gpus": self.gpus, "gpu_names": gpu_names(), "model": a.model, "engine_options": a.engine_options,
                "requests_per_gpu": a.requests_per_gpu, "prompt_len": a.prompt_len, "sampling": SAMPLING,
                "profiles": {"fixed": {"max_tokens": a.fixed_len},
                             "heavy": {"median": a.heavy_median, "sigma": a.heavy_sigma, "cap": a.heavy_cap}},
                "output_tokens_per_gpu": expected, "threads": a.threads, "seed": a.seed,
                "variants": [v.__dict__ for v in self.variants], "budget_s": a.budget_s,
                "compile_cache_before": compile_cache_state()}

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.out)

    def skip(self, variant: Variant, profiles: list[str], why: str) -> None:
        for p in profiles:
            self.data["skipped"].append({"variant": variant.name, "profile": p, "reason": why})
        log(f"SKIP {variant.name} {'+'.join(profiles)}: {why}")
        self.save()

    def record_start(self, what: str, gpus: int, start_s: float, cache: str, extra: dict | None = None) -> None:
        self.data["starts"].append({"what": what, "gpus": gpus, "start_s": round(start_s, 2),
                                    "compile_cache": cache, **(extra or {})})
        self.budget.saw_start(cache, start_s)
        self.save()

    def record(self, variant: Variant, profile: str, parts: list[dict], start_s: float, api: str) -> None:
        t_start = min(p["t_start"] for p in parts)
        makespan = max(p["t_start"] + p["duration_s"] for p in parts) - t_start
        per_gpu = [g for p in parts for g in p["per_gpu"]]
        for g in per_gpu:
            g["busy_share"] = round(g["busy_s"] / makespan, 4) if makespan > 0 else None
        tokens = sum(p["output_tokens"] for p in parts)
        n = sum(p["requests"] for p in parts)
        expected = sum(m for _, m in self._requests(variant, profile))
        res = {"variant": variant.name, "kind": variant.kind, "profile": profile, "gpus": variant.k,
               "requests": n, "output_tokens": tokens, "expected_output_tokens": expected,
               "makespan_s": round(makespan, 3), "output_tok_s": round(tokens / makespan, 1),
               "requests_s": round(n / makespan, 2), "engine_start_s": round(start_s, 1), "api": api,
               "errors": sum(p.get("errors", 0) for p in parts),
               "first_error": next((p["first_error"] for p in parts if p.get("first_error")), None),
               "finish_reasons": dict(sum((Counter(p.get("finish_reasons", {})) for p in parts), Counter())),
               "per_gpu": per_gpu}
        self.data["results"].append(res)
        self.budget.saw_run(profile, makespan, variant.kind)
        self.save()
        shares = [g["busy_share"] for g in per_gpu if g["busy_share"] is not None]
        log(f"{variant.name:8s} {profile:5s} {variant.k} GPU  {tokens:>9,d} tok  {makespan:7.1f}s  "
            f"{tokens / makespan:>9,.0f} tok/s  busy {min(shares):.2f}-{max(shares):.2f}"
            + (f"  ERRORS {res['errors']}: {res['first_error']}" if res["errors"] else "")
            + ("" if tokens == expected else f"  (expected {expected:,d} tokens)"))

    def _requests(self, variant: Variant, profile: str) -> list:
        reqs = self.requests[profile][:variant.k * self.args.requests_per_gpu]
        if variant.kind == "dspy" and self.args.dspy_requests:
            reqs = reqs[:self.args.dspy_requests]
        return reqs

    def fits(self, variant: Variant, profile: str) -> bool:
        need = self.budget.est_run(profile, variant.kind) + 20
        if self.budget.left() < need:
            self.skip(variant, [profile], f"time budget: {self.budget.left():.0f}s left, needs ~{need:.0f}s")
            return False
        return True

    def wave_fits(self, variants: list[Variant], cache: str, min_start: float = 0.0) -> bool:
        """Start a wave when its engines' start and its first measurement fit; later
        measurements are checked one by one (``fits``)."""
        start = max(min_start, self.budget.est_start(cache))
        runs = [self.budget.est_run(p, v.kind) for v in variants for p in v.profiles]
        if self.budget.left() < start + 30 + min(runs, default=0):
            for v in variants:
                self.skip(v, v.profiles, f"time budget: {self.budget.left():.0f}s left, "
                                         f"the wave needs ~{start + 30 + sum(runs):.0f}s")
            return False
        return True

    # -- the waves --------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        log(f"GPUs {self.gpus}, model {a.model}, {a.requests_per_gpu} requests per GPU, "
            f"variants {[v.name + ':' + '+'.join(v.profiles) for v in self.variants]}, budget {a.budget_s:.0f}s")
        self.save()
        llm_variants = [v for v in self.variants if v.kind in ("bare", "shard")]
        if llm_variants:
            self.guarded(self.llm_wave, llm_variants)
        pool_variants = [v for v in self.variants if v.kind in ("mpdp", "dspy")]
        for sizes in pool_waves([v.k for v in pool_variants], len(self.gpus)):
            self.guarded(self.pool_wave, [v for v in pool_variants if v.k in sizes], sizes)
        serve_variants = [v for v in self.variants if v.kind == "serve"]
        if serve_variants:
            self.guarded(self.serve_wave, serve_variants)
        self.data["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.budget.t0, 1)
        self.save()

    def guarded(self, wave, variants, *extra) -> None:
        try:
            wave(variants, *extra)
        except Exception:
            err = traceback.format_exc()
            log(f"wave {[v.name for v in variants]} failed:\n{err}")
            self.data.setdefault("failures", []).append({"variants": [v.name for v in variants], "error": err[-4000:]})
            self.save()
        wait_gpus_free(self.gpus)

    def llm_wave(self, variants: list[Variant]) -> None:
        cache = compile_cache_state()
        if not self.wave_fits(variants, cache):
            return
        k = max(v.k for v in variants)
        log(f"wave: {k} vllm.LLM process(es), one per GPU (compile cache {cache})")
        hosts = [Host(f"llm{i}", "llm", [g], self.args, self.log_dir) for i, g in enumerate(self.gpus[:k])]
        try:
            start_hosts(hosts, min(900, max(60, self.budget.left())))
            for i, h in enumerate(hosts):
                what = "bare vllm.LLM" + (f" (started alongside {k - 1} more)" if k > 1 else "")
                self.record_start(f"{what} gpu {h.gpus[0]}", 1, h.ready["start_s"], cache, {"host": h.name})
            for profile in self.args.profiles:
                for v in sorted(variants, key=lambda v: v.k):
                    if profile not in v.profiles or not self.fits(v, profile):
                        continue
                    reqs = self._requests(v, profile)
                    shards = [reqs[i * len(reqs) // v.k:(i + 1) * len(reqs) // v.k] for i in range(v.k)]
                    parts = run_on_hosts(list(zip(hosts[:v.k], shards)), "generate", self.args, self.timeout())
                    start = max(h.ready["start_s"] for h in hosts[:v.k])
                    self.record(v, profile, parts, start, "LLM.generate")
        finally:
            for h in hosts:
                h.stop()

    def pool_wave(self, variants: list[Variant], sizes: list[int]) -> None:
        cache = compile_cache_state()
        if not self.wave_fits(variants, cache):
            return
        hosts, offset = {}, 0
        for size in sizes:                                    # disjoint GPUs, started side by side
            hosts[size] = Host(f"pool{size}", "pool", self.gpus[offset:offset + size], self.args, self.log_dir)
            offset += size
        log(f"wave: mpdp pools of {sizes} workers on GPUs "
            f"{[h.gpus for h in hosts.values()]} (compile cache {cache})")
        try:
            start_hosts(list(hosts.values()), min(900, max(60, self.budget.left())))
            for size, h in hosts.items():
                others = f" (started alongside pools of {[s for s in sizes if s != size]})" if len(sizes) > 1 else ""
                self.record_start(f"mpdp pool, {size} worker{'s' if size > 1 else ''}{others}", size, h.ready["start_s"], cache,
                                  {"host": h.name, "workers": h.ready["info"]["workers"]})
            for size in sizes:
                h = hosts[size]
                for profile in self.args.profiles:
                    for v in [v for v in variants if v.k == size]:
                        if profile not in v.profiles or not self.fits(v, profile):
                            continue
                        mode = "generate" if v.kind == "mpdp" else "dspy"
                        parts = run_on_hosts([(h, self._requests(v, profile))], mode, self.args, self.timeout())
                        api = "Pool.generate" if mode == "generate" else f"Pool.submit x {self.args.threads} threads"
                        self.record(v, profile, parts, h.ready["start_s"], api)
        finally:
            for h in hosts.values():
                h.stop()

    def serve_wave(self, variants: list[Variant]) -> None:
        cache = compile_cache_state()
        if not self.wave_fits(variants, cache, min_start=120.0):   # the server starts slower (~110 s seen)
            return
        k = max(v.k for v in variants)
        log(f"wave: {k} OpenAI api_server(s) (compile cache {cache})")
        servers = None
        try:
            servers = Servers(self.gpus[:k], self.args, self.log_dir)
            self.record_start(f"vllm api_server x {k}", k, max(servers.start_s), cache)
            for profile in self.args.profiles:
                for v in variants:
                    if profile not in v.profiles or not self.fits(v, profile):
                        continue
                    part = servers.run(self._requests(v, profile), self.args.threads)
                    self.record(v, profile, [part], max(servers.start_s), f"HTTP /v1/completions x {self.args.threads} threads")
        finally:
            if servers is not None:
                servers.stop()

    def timeout(self) -> float:
        return max(60.0, self.budget.left() + 60)

    # -- the report -------------------------------------------------------------------------------
    def report(self) -> str:
        text = markdown_report(self.data)
        self.out.with_suffix(".md").write_text(text)
        return text


def markdown_report(data: dict) -> str:
    results = data["results"]
    lines = [f"## Scaling: {data['meta'].get('model')} on {len(data['meta'].get('gpus', []))} GPU(s) "
             f"({', '.join(sorted(set(data['meta'].get('gpu_names') or ['?'])))})", ""]
    for profile in ("fixed", "heavy"):
        rows = [r for r in results if r["profile"] == profile]
        if not rows:
            continue
        base = next((r for r in rows if r["variant"] == "bare"), None)
        lines += [f"### profile `{profile}`", "",
                  "| variant | GPUs | requests | output tok/s | req/s | makespan s | baseline tok/s (bare) "
                  "| ratio | per-GPU efficiency | GPU busy share min-max | engine start s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            ratio = r["output_tok_s"] / base["output_tok_s"] if base else None
            shares = [g["busy_share"] for g in r["per_gpu"] if g.get("busy_share") is not None]
            cells = [r["variant"], r["gpus"], r["requests"], f"{r['output_tok_s']:,.0f}", f"{r['requests_s']:.1f}",
                     f"{r['makespan_s']:.1f}", f"{base['output_tok_s']:,.0f}" if base else "-",
                     f"{ratio:.2f}x" if ratio else "-", f"{ratio / r['gpus']:.0%}" if ratio else "-",
                     f"{min(shares):.2f}-{max(shares):.2f}" if shares else "-", f"{r['engine_start_s']:.0f}"]
            note = f" {r['errors']} errors" if r.get("errors") else ""
            lines.append("| " + " | ".join(map(str, cells)) + " |" + note)
        lines.append("")
    by = {(r["variant"], r["profile"]): r for r in results}
    pairs = [("mpdp", "shard"), ("dspy", "mpdp"), ("serve", "mpdp"), ("mpdp", "bare")]
    comps = []
    for (name, profile), r in by.items():
        for kind, against in pairs:
            if not name.startswith(kind):
                continue
            other = "bare" if against == "bare" else against + name[len(kind):]
            if against == "bare" and name != "mpdp1":
                continue
            if (other, profile) in by:
                x, y = r["output_tok_s"], by[(other, profile)]["output_tok_s"]
                comps.append(f"| {name} vs {other} | {profile} | {x:,.0f} | {y:,.0f} | {x / y:.2f}x |")
    if comps:
        lines += ["### comparisons (output tok/s)", "", "| figure | profile | value | baseline | ratio |",
                  "|---|---|---:|---:|---:|", *comps, ""]
    if data["starts"]:
        lines += ["### engine start (process start to engine ready, before warm-up)", "",
                  "| what | GPUs | start s | torch.compile cache |", "|---|---:|---:|---|"]
        lines += [f"| {s['what']} | {s['gpus']} | {s['start_s']:.1f} | {s['compile_cache']} |" for s in data["starts"]]
        bare = next((s for s in data["starts"] if s["what"].startswith("bare")), None)
        pools = [s for s in data["starts"] if s["what"].startswith("mpdp pool")]
        if bare and pools:
            big = max(pools, key=lambda s: s["gpus"])
            lines += ["", f"{big['gpus']}-worker pool start {big['start_s']:.0f} s ({big['compile_cache']} compile cache) "
                          f"against one bare engine {bare['start_s']:.0f} s ({bare['compile_cache']}): "
                          f"{big['start_s'] / bare['start_s']:.2f}x"]
        lines.append("")
    if data["skipped"]:
        lines += ["### skipped", ""] + [f"- {s['variant']} {s['profile']}: {s['reason']}" for s in data["skipped"]] + [""]
    if data.get("failures"):
        lines += ["### failures", ""] + [f"- {f['variants']}: {f['error'].strip().splitlines()[-1]}"
                                         for f in data["failures"]] + [""]
    return "\n".join(lines)


# -- the machine ------------------------------------------------------------------------------------
def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def wait_gpus_free(gpus: list[str], timeout: float = 60.0, max_used_mib: int = 2048) -> None:
    """Between waves: wait until the engines' memory is back (a process's exit frees it, a bit later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            used = [int(x) for x in out.split()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return
        if all(u <= max_used_mib for u in used):
            return
        time.sleep(1.0)
    log(f"warning: GPU memory still in use after {timeout:.0f}s: {used} MiB")


def compile_cache_state() -> str:
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm")) / "torch_compile_cache"
    try:
        return "warm" if root.is_dir() and any(root.iterdir()) else "cold"
    except OSError:
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models = os.environ.get("MPDP_GPU_MODELS", ".")
    p.add_argument("--model", default=f"{models}/qwen3-8b-shape")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--variants", default="bare,shard,mpdp,dspy:heavy,mpdp1:fixed,mpdp2:fixed",
                   help="comma list of bare, shard<k>, mpdp<k>, dspy<k>, serve<k> (k defaults to --gpus), "
                        "each with an optional :profile+profile")
    p.add_argument("--profiles", default="fixed,heavy")
    p.add_argument("--requests-per-gpu", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--fixed-len", type=int, default=1024)
    p.add_argument("--heavy-median", type=float, default=300.0)
    p.add_argument("--heavy-sigma", type=float, default=0.9, help="of the lognormal's log")
    p.add_argument("--heavy-cap", type=int, default=4096)
    p.add_argument("--threads", type=int, default=80, help="client threads of dspy<k> and serve<k>")
    p.add_argument("--dspy-requests", type=int, default=0, help="cap on dspy<k>'s requests (0: all)")
    p.add_argument("--engine-options", default="{}", help="JSON of extra vllm.EngineArgs for every engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-timeout", type=float, default=420.0)
    p.add_argument("--budget-s", type=float, default=540.0, help="skip what would not finish within this")
    p.add_argument("--json", default="scaling.json")
    args = p.parse_args(argv)
    args.profiles = [x for x in args.profiles.split(",") if x]
    args.engine_options = {"load_format": "dummy", **json.loads(args.engine_options)}
    config = json.loads((Path(args.model) / "config.json").read_text())
    args.vocab_size = int(config["vocab_size"])
    n = len(visible_gpus())
    args.gpus = min(args.gpus or n, n)
    if args.gpus < 1:
        raise SystemExit("no GPU is visible")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        print(bench.report(), flush=True)
        log(f"results in {bench.out} and {bench.out.with_suffix('.md')}, engine logs in {bench.log_dir}")
        skipped = {}
        for s in bench.data["skipped"]:
            skipped.setdefault(s["variant"], []).append(s["profile"])
        if skipped:
            rest = ",".join(f"{v}:{'+'.join(p)}" for v, p in skipped.items())
            log(f"to measure what was skipped (on the same warm machine): --variants {rest}")
    return 0 if bench.data["results"] and not bench.data.get("failures") else 1


if __name__ == "__main__":
    sys.exit(main())
