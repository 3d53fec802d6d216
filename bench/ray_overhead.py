"""What the Ray launcher costs against the local one, in the same run.

CPU (default, ``--engine echo``): a 3-node Ray cluster on loopback (``ray.cluster_utils.Cluster``,
one custom ``sim_gpu`` per node, so each of the 3 workers is on a node of its own), and on the
same machine the local launcher with 3 workers over ``ipc://`` and over ``tcp://`` + Curve
(which splits the cost of TCP + Curve from that of Ray). For each:
  - batch: requests/s (and wire bytes/s) through ``generate(list)`` of ``--prompt-chars``-long
    prompts, and the dispatcher thread's CPU time per request (its ceiling: 1 / that);
  - light: p50/p99 latency of one thread, one request at a time;
  - threads: requests/s and p50 with 32 threads, each submitting one request and waiting.
Wire bytes per request (SUBMIT + RESULTS frames, msgpack) are measured on the encoded frames.

GPU (``--engine vllm --model PATH``): one GPU, vLLM through the local launcher and then the
Ray launcher (a single-node Ray started here, or ``--ray-address``), same model and load:
output tokens/s (``ignore_eos``, fixed ``--max-tokens``).

    python -m bench.ray_overhead --json bench/results/ray-2core.json
    python -m bench.ray_overhead --prompt-chars 2000 --requests 5000 --json bench/results/ray-2core-2kB.json
    python -m bench.ray_overhead --engine vllm --model Qwen/Qwen3-8B --json bench/results/ray-1xh200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

# Read when Ray is first imported: every node of the test cluster reports 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import mpdp
from bench.overhead import run_light, run_threads, thread_clock
from mpdp.engines.base import EngineRequest, EngineResult
from mpdp.wire import protocol
from mpdp.wire.protocol import Tag

LOOPBACK = "127.0.0.1"
NODE = dict(node_ip_address=LOOPBACK, num_cpus=1, resources={"sim_gpu": 1})


def wire_bytes(prompt: str, text: str) -> int:
    """Bytes on the wire for one request and its result, as the pool frames them (one a frame)."""
    req = EngineRequest(id=123456, prompt=prompt, params={"max_tokens": 64})
    res = EngineResult(id=123456, texts=[text], finish_reasons=["stop"], prompt_tokens=len(prompt),
                       completion_tokens=len(text))
    sub = protocol.encode(Tag.SUBMIT, [protocol.request_to_wire(req)])
    out = protocol.encode(Tag.RESULTS, [protocol.result_to_wire(res)])
    return sum(map(len, sub)) + sum(map(len, out))


def bench_echo_pool(label: str, n_batch: int, n_light: int, n_threaded: int, chars: int, **pool_kwargs) -> dict:
    t0 = time.perf_counter()
    with mpdp.Pool(engine="echo", num_workers=3, **pool_kwargs) as pool:
        out = {"config": label, "start_s": time.perf_counter() - t0,
               "endpoint": pool._dispatcher.transport.endpoint.rsplit(":", 1)[0]}
        pool.generate([f"warm {i}" for i in range(2000)])
        dispatcher = pool._dispatcher._thread
        # Each prompt is `chars` long and comes back whole (echo), so a request carries it twice.
        prompts = [f"request number {i} ".ljust(chars, "x") for i in range(n_batch)]
        cpu0, t0 = thread_clock(dispatcher), time.perf_counter()
        results = pool.generate(prompts, max_tokens=chars)
        elapsed, cpu = time.perf_counter() - t0, thread_clock(dispatcher) - cpu0
        assert [c.text for c in results] == prompts
        out["wire_bytes_per_request"] = wire_bytes(prompts[0], prompts[0])
        out["batch"] = {"requests": n_batch, "requests_per_s": n_batch / elapsed,
                        "wire_bytes_per_s": n_batch / elapsed * out["wire_bytes_per_request"],
                        "dispatcher_cpu_us_per_request": cpu / n_batch * 1e6}
        out["light"] = run_light(pool, n_light)
        out["threads32"] = run_threads(lambda p: pool.submit(p).result(), 32, n_threaded)
        out["workers_by_node"] = sorted(str(w["node"]) for w in pool.stats()["workers"])
    return out


def echo_main(args) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    n = dict(n_batch=args.requests, n_light=args.light, n_threaded=args.threaded, chars=args.prompt_chars)
    runs = []
    runs.append(bench_echo_pool("local, ipc", **n))
    runs.append(bench_echo_pool("local, tcp + Curve", transport="tcp", **n))
    os.environ["MPDP_RAY_RESOURCES"] = json.dumps({"CPU": 1, "sim_gpu": 1})   # one worker a node
    # Ray's session folders (and its address file) in a private folder, removed at the end.
    temp_dir = tempfile.mkdtemp(prefix="mpdp-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    node = NODE
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        for _ in range(2):
            cluster.add_node(**node)
        assert cluster.address.startswith(LOOPBACK)
        ray.init(address=cluster.address, log_to_driver=False)
        assert {x["NodeManagerAddress"] for x in ray.nodes() if x["Alive"]} == {LOOPBACK}
        r = bench_echo_pool("ray, 3 nodes, tcp + Curve", launcher="ray", **n)
        r["ray_nodes"] = len([x for x in ray.nodes() if x["Alive"]])
        runs.append(r)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    base = runs[0]
    for r in runs:
        r["ratio_vs_local_ipc"] = {
            "batch_requests_per_s": r["batch"]["requests_per_s"] / base["batch"]["requests_per_s"],
            "light_p50": r["light"]["p50_us"] / base["light"]["p50_us"],
            "threads32_requests_per_s": r["threads32"]["requests_per_s"] / base["threads32"]["requests_per_s"]}
    return {"runs": runs, "prompt_chars": args.prompt_chars}


def vllm_main(args) -> dict:
    import ray

    prompts = [f"Write a long story about the number {i}." for i in range(args.requests)]
    sampling = dict(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    options = json.loads(args.engine_options)
    runs = []
    # A Ray started here lives on loopback (as the CPU cluster does) with its session files in a
    # private folder, removed at the end.
    temp_dir = tempfile.mkdtemp(prefix="mpdp-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    for launcher in args.order.split(","):
        kwargs = {"launcher": launcher}
        if launcher == "ray":
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=False)
            else:
                ray.init(num_gpus=1, log_to_driver=False, include_dashboard=False, _node_ip_address=LOOPBACK,
                         _temp_dir=temp_dir)
                assert {x["NodeManagerAddress"] for x in ray.nodes() if x["Alive"]} == {LOOPBACK}
        try:
            t0 = time.perf_counter()
            with mpdp.Pool(args.model, engine="vllm", num_gpus=1, engine_options=options, **kwargs) as pool:
                start_s = time.perf_counter() - t0
                pool.generate(prompts[:64], **sampling)                 # warm-up
                t0 = time.perf_counter()
                out = pool.generate(prompts, **sampling)
                elapsed = time.perf_counter() - t0
            tokens = sum(c.completion_tokens for c in out)
            runs.append({"config": launcher, "start_s": start_s, "requests": len(prompts),
                         "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed})
        finally:
            if launcher == "ray":
                ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    by = {r["config"]: r for r in runs}
    by["ray"]["ratio_vs_local"] = by["ray"]["output_tokens_per_s"] / by["local"]["output_tokens_per_s"]
    return {"runs": runs, "model": args.model, "max_tokens": args.max_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("echo", "vllm"), default="echo")
    p.add_argument("--model", default=None, help="vllm: the model (a local folder or a HF name)")
    p.add_argument("--requests", type=int, default=None, help="batch size (echo: 20000; vllm: 2048)")
    p.add_argument("--light", type=int, default=1000, help="echo: one-at-a-time requests for latency")
    p.add_argument("--threaded", type=int, default=6400, help="echo: requests over 32 threads")
    p.add_argument("--prompt-chars", type=int, default=20, help="echo: characters per prompt (and per result)")
    p.add_argument("--max-tokens", type=int, default=512, help="vllm: output tokens per request")
    p.add_argument("--engine-options", default="{}", help="vllm: engine_options as JSON")
    p.add_argument("--order", default="local,ray", choices=("local,ray", "ray,local"),
                   help="vllm: which launcher runs first (the second finds the GPU and its caches warm)")
    p.add_argument("--ray-address", default=None, help="vllm: an existing Ray cluster (default: start one here)")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args()
    if args.engine == "vllm":
        if not args.model:
            p.error("--engine vllm needs --model")
        args.requests = args.requests or 2048
        result = vllm_main(args)
    else:
        args.requests = args.requests or 20000
        result = echo_main(args)
    result.update({"engine": args.engine, "cpus": os.cpu_count(), "python": platform.python_version(),
                   "command": " ".join(["python -m bench.ray_overhead", *sys.argv[1:]])})
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
