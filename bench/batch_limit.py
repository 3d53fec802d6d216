"""Does the adaptive batch limit beat vLLM at its own defaults? One GPU, one command, side by side.

    python -m bench.batch_limit --json out/batch_limit.json

Workload (saturating): --requests (2,048) prompts of --prompt-len (256) random token ids,
--max-tokens (512) output tokens each (ignore_eos, temperature 0.6, top_p 0.95), the
Qwen3-8B-shaped model with random weights (load_format="dummy"), CUDA graphs on.

In this order, each engine started once and kept for what can share it (a start is 60-105 s):

  1. bare vllm.LLM.generate at its defaults                          bare:default
  2. bare vllm.LLM.generate at the first --bare-sweep max_num_seqs   bare:512
  3. one mpdp pool (one vLLM worker, engine defaults: max_num_seqs 1024 on an H100/H200):
       mpdp:adaptive   the batch limit at its default (the controller)
       mpdp:off        the old fixed credit (max_num_seqs plus a margin)
       mpdp:<n>        fixed limits (--pool-fixed, e.g. 512), if the budget allows
  4. bare at the rest of --bare-sweep (e.g. 768, 256), if the budget allows

--no-bare skips 1, 2 and 4: one engine start, then mpdp:adaptive, the --pool-fixed limits and
mpdp:off, in that order (a short check of the controller against a fixed limit on the same engine):

    python -m bench.batch_limit --no-bare --pool-fixed 512 --budget-s 330 --json out/check.json

A time budget (--budget-s) skips what would not finish, and says so; results are written to the
JSON after every measurement. Each mpdp row also carries the controller's trace (its limit, the
reason and the requests in flight, sampled every half second).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback
from pathlib import Path

from bench.scaling import SAMPLING, Host, compile_cache_state, gpu_names, log, start_hosts, wait_gpus_free


class LimitPoolRunner:
    """An mpdp pool of one vLLM worker whose batch limit each measurement sets (the engine stays)."""

    def __init__(self, spec: dict):
        import mpdp

        engine = spec.get("engine", "vllm")              # echo: the plumbing test on CPU
        where = {"num_gpus": len(spec["gpus"])} if engine == "vllm" else {"num_workers": 1}
        self.pool = mpdp.Pool(model=spec["model"], engine=engine, engine_options=spec["engine_options"],
                              worker_logs="inherit", batch_limit=spec.get("batch_limit", "auto"), **where)

    def prepare(self, requests, sampling, mode, threads) -> None:
        self.job = ([{"prompt_token_ids": ids, "max_tokens": m} for ids, m in requests], sampling)
        self.pool.set_batch_limit(mode if mode != "generate" else "auto")

    def go(self) -> dict:
        items, sampling = self.job
        trace, stop = [], threading.Event()
        t0 = time.monotonic()

        def sample():
            while not stop.wait(0.5):
                w = self.pool.stats()["workers"][0]
                trace.append([round(time.monotonic() - t0, 2), w.get("batch_limit"), w.get("batch_limit_reason"),
                              w.get("in_flight"), w.get("batch_limit_tokens_s")])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        comps = self.pool.generate(items, return_exceptions=True, **sampling)
        duration = time.monotonic() - t0
        stop.set()
        sampler.join()
        done = [c for c in comps if not isinstance(c, BaseException)]
        w = self.pool.stats()["workers"][0]
        return {"duration_s": duration, "requests": len(comps), "output_tokens": sum(c.completion_tokens for c in done),
                "errors": len(comps) - len(done), "final_limit": w.get("batch_limit"),
                "final_reason": w.get("batch_limit_reason"), "capacity": w.get("capacity"), "trace": trace}

    def info(self) -> dict:
        w = self.pool.stats()["workers"][0]
        return {k: w.get(k) for k in ("capacity", "batch_limit", "batch_limit_ceiling", "kv_cache_tokens")}

    def close(self) -> None:
        self.pool.close()


def make_requests(args) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [([rng.randrange(100, args.vocab_size) for _ in range(args.prompt_len)], args.max_tokens)
            for _ in range(args.requests)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.json)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.out.parent / (self.out.stem + "-logs")
        self.log_dir.mkdir(exist_ok=True)
        self.t0 = time.monotonic()
        self.requests = make_requests(args)
        self.start_s: list[float] = []
        self.run_s: list[float] = []
        self.data = {"meta": {"model": args.model, "gpu": gpu_names()[:1], "date": time.strftime("%Y-%m-%d %H:%M"),
                              "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                              "engine_options": args.engine_options, "sampling": SAMPLING},
                     "results": [], "starts": [], "skipped": [], "failures": []}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def est_start(self) -> float:
        # The last start: the first one may have compiled (cold cache), the later ones reuse it.
        return 1.1 * self.start_s[-1] + 10 if self.start_s else 120.0

    def est_run(self) -> float:
        return 1.1 * max(self.run_s) + 5 if self.run_s else 90.0

    def save(self) -> None:
        self.out.write_text(json.dumps(self.data, indent=1))

    def skip(self, names: list[str], why: str) -> None:
        for n in names:
            self.data["skipped"].append({"variant": n, "reason": why})
            log(f"skip {n}: {why}")
        self.save()

    def record(self, name: str, res: dict, host: Host) -> None:
        tok_s = res["output_tokens"] / res["duration_s"]
        row = {"variant": name, "output_tok_s": round(tok_s, 1), **{k: v for k, v in res.items() if k != "ok"},
               "engine": host.ready["info"]}
        self.data["results"].append(row)
        self.run_s.append(res["duration_s"])
        log(f"{name}: {tok_s:,.0f} output tok/s ({res['output_tokens']} tokens in {res['duration_s']:.1f}s, "
            f"{res.get('errors', 0)} errors){'' if 'final_limit' not in res else ', limit ' + str(res['final_limit']) + ' (' + str(res['final_reason']) + ')'}")
        self.save()

    def host(self, name: str, kind: str, engine_options: dict, extra: dict | None = None) -> Host | None:
        cache = compile_cache_state()
        if self.left() < self.est_start() + self.est_run():
            return None
        args = argparse.Namespace(**{**vars(self.args), "engine_options": engine_options})
        h = Host(name, kind, ["0"], args, self.log_dir, extra)
        start_hosts([h], min(600, max(60, self.left())))
        self.start_s.append(h.ready["start_s"])
        self.data["starts"].append({"what": name, "start_s": round(h.ready["start_s"], 1), "compile_cache": cache})
        return h

    def measure(self, h: Host, name: str, mode: str) -> None:
        if self.left() < self.est_run():
            self.skip([name], f"time budget: {self.left():.0f}s left, a run takes ~{self.est_run():.0f}s")
            return
        h.conn.send({"op": "prepare", "requests": self.requests, "sampling": SAMPLING, "mode": mode, "threads": 1})
        h.recv(120)
        h.conn.send({"op": "go"})
        self.record(name, h.recv(max(120, self.left() + 60)), h)

    def wave(self, names: list[str], body) -> None:
        try:
            body()
        except Exception:
            err = traceback.format_exc()
            log(f"{names} failed:\n{err}")
            self.data["failures"].append({"variants": names, "error": err[-4000:]})
            self.save()
        wait_gpus_free(["0"])

    def run(self) -> None:
        a = self.args
        opts = a.engine_options
        fixed = [str(n) for n in a.pool_fixed]
        # Without bare runs the fixed limits are the yardstick: measured before the old credit.
        if a.pool_modes is not None:                     # as given (none: no pool engine at all)
            pool_modes = a.pool_modes + fixed
        else:
            pool_modes = ["adaptive"] + fixed + ["off"] if a.no_bare else ["adaptive", "off"] + fixed

        def pool():
            h = self.host("pool", "bench.batch_limit:LimitPoolRunner", opts, {"batch_limit": "adaptive"})
            if h is None:
                return self.skip([f"mpdp:{m}" for m in pool_modes], "time budget: no room for an engine start")
            try:
                for mode in pool_modes:
                    self.measure(h, f"mpdp:{mode}", mode if not mode.isdigit() else int(mode))
            finally:
                h.stop()

        def bare(n: int | None):
            name = f"bare:{n or 'default'}"
            h = self.host(f"bare-{n or 'default'}", "llm", {**opts, **({"max_num_seqs": n} if n else {})})
            if h is None:
                return self.skip([name], "time budget: no room for an engine start and a run")
            try:
                self.measure(h, name, "generate")
            finally:
                h.stop()

        log(f"{a.requests} requests x {a.max_tokens} tokens, prompts {a.prompt_len}, model {a.model}, "
            f"budget {a.budget_s:.0f}s")
        # What decides first: bare at its defaults, bare at the first sweep value, mpdp; then the rest.
        first, rest = ([], []) if a.no_bare else ([None] + a.bare_sweep[:1], a.bare_sweep[1:])
        if a.no_bare_default and first:
            first = first[1:]
        for n in first:
            self.wave([f"bare:{n or 'default'}"], lambda n=n: bare(n))
        if pool_modes:
            self.wave(["mpdp"], pool)
        for n in rest:
            self.wave([f"bare:{n}"], lambda n=n: bare(n))
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.save()

    def report(self) -> str:
        rows = self.data["results"]
        # The baseline: bare vLLM at its defaults, or (--no-bare) the pool's old credit.
        base = next((r for r in rows if r["variant"] == "bare:default"), None) \
            or next((r for r in rows if r["variant"] == "mpdp:off"), None)
        best_fixed = max((r for r in rows if r["variant"].startswith("bare:") or r["variant"].split(":")[1].isdigit()),
                         key=lambda r: r["output_tok_s"], default=None)
        lines = [f"## Batch limit: {self.data['meta']['gpu']} {self.data['meta']['date']}", "",
                 f"| variant | output tok/s | vs {base['variant'] if base else 'bare:default'} | vs best fixed "
                 "| final limit |", "|---|---:|---:|---:|---|"]
        for r in rows:
            vs = f"{r['output_tok_s'] / base['output_tok_s']:.3f}x" if base else "-"
            vb = f"{r['output_tok_s'] / best_fixed['output_tok_s']:.3f}x" if best_fixed else "-"
            lim = f"{r.get('final_limit')} ({r.get('final_reason')})" if "final_limit" in r else "-"
            lines.append(f"| {r['variant']} | {r['output_tok_s']:,.0f} | {vs} | {vb} | {lim} |")
        for s in self.data["skipped"]:
            lines.append(f"- skipped {s['variant']}: {s['reason']}")
        for f in self.data["failures"]:
            lines.append(f"- failed {f['variants']}: {f['error'].strip().splitlines()[-1]}")
        return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    models = os.environ.get("MPDP_GPU_MODELS", ".")
    p.add_argument("--model", default=f"{models}/qwen3-8b-shape")
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--bare-sweep", default="512", help="comma list of max_num_seqs for bare LLM.generate "
                   "after its defaults (e.g. 512,768,256)")
    p.add_argument("--no-bare", action="store_true", help="no bare LLM.generate runs: one pool engine only "
                   "(adaptive, then --pool-fixed, then off)")
    p.add_argument("--pool-modes", default=None, help="comma list of pool settings measured in this order "
                   "(default adaptive,off; 'none': no pool engine), then --pool-fixed")
    p.add_argument("--no-bare-default", action="store_true", help="skip bare LLM.generate at its defaults "
                   "(a sweep continued in a second call)")
    p.add_argument("--pool-fixed", default="", help="comma list of fixed batch limits measured on the pool's engine")
    p.add_argument("--engine-options", default="{}", help="JSON of extra vllm.EngineArgs for every engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=530.0)
    p.add_argument("--json", default="batch_limit.json")
    args = p.parse_args(argv)
    args.bare_sweep = [int(x) for x in args.bare_sweep.split(",") if x]
    args.pool_fixed = [int(x) for x in args.pool_fixed.split(",") if x]
    if args.pool_modes is not None:
        args.pool_modes = [m for m in args.pool_modes.split(",") if m and m != "none"]
    args.engine_options = {"load_format": "dummy", **json.loads(args.engine_options)}
    args.vocab_size = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    return args


def main(argv=None) -> int:
    bench = Bench(parse_args(argv))
    try:
        bench.run()
    finally:
        text = bench.report()
        bench.out.with_suffix(".md").write_text(text)
        print(text, flush=True)
    return 0 if bench.data["results"] and not bench.data["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
