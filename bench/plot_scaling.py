"""Chart of bench/scaling.py's results: output tokens/s against GPUs, with the ideal linear line.

    python -m bench.plot_scaling out/scaling-1.json [out/scaling-2.json ...] -o out/scaling.png \
        [--markdown out/scaling.md]

Several JSON files (runs on the same warm machine, split to fit a time limit) are merged: a later
file's measurement of a (variant, profile) replaces an earlier one. ``--markdown`` writes the
merged tables as bench/scaling.py prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.scaling import markdown_report  # stdlib and mpdp only at import: no torch, no vLLM

STYLES = {  # kind -> (label, matplotlib format, colour): the same colours in every panel
    "mpdp": ("mpdp Pool.generate", "o-", "tab:blue"),
    "shard": ("contiguous shards, LLM.generate per GPU (seed)", "s--", "tab:orange"),
    "dspy": ("DSPy pattern (threads x Pool.submit)", "^:", "tab:green"),
    "serve": ("api_server per GPU, HTTP threads", "v:", "tab:purple"),
    "bare": ("bare LLM.generate, 1 GPU", "*", "tab:red"),
}


def merge(paths: list[str]) -> dict:
    data = {"meta": {}, "starts": [], "results": [], "skipped": [], "failures": []}
    measured: dict[tuple[str, str], dict] = {}
    for path in paths:
        d = json.loads(Path(path).read_text())
        data["meta"] = data["meta"] or d.get("meta", {})
        data["starts"] += d.get("starts", [])
        data["skipped"] += d.get("skipped", [])
        data["failures"] += d.get("failures", [])
        for r in d.get("results", []):
            measured[(r["variant"], r["profile"])] = r
    data["results"] = list(measured.values())
    data["skipped"] = [s for s in data["skipped"] if (s["variant"], s["profile"]) not in measured]
    return data


def plot(data: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [p for p in ("fixed", "heavy") if any(r["profile"] == p for r in data["results"])]
    if not profiles:
        raise SystemExit("no results to plot")
    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 5), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        rows = [r for r in data["results"] if r["profile"] == profile]
        max_k = max(r["gpus"] for r in rows)
        base = next((r for r in rows if r["variant"] == "bare"), None)
        if base:
            ks = list(range(1, max_k + 1))
            ax.plot(ks, [base["output_tok_s"] * k for k in ks], color="0.6", linestyle="--", linewidth=1,
                    label="ideal: bare x GPUs")
        for kind, (label, fmt, colour) in STYLES.items():
            pts = sorted((r["gpus"], r["output_tok_s"]) for r in rows if r["kind"] == kind)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, fmt, color=colour, label=label, markersize=12 if kind == "bare" else 7)
            for x, y in pts:
                ax.annotate(f"{y / 1000:.1f}k", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.set_xticks(range(1, max_k + 1))
        ax.set_xlabel("GPUs")
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"profile '{profile}'")
        ax.legend(fontsize=8, loc="upper left")
    meta = data.get("meta", {})
    names = sorted(set(meta.get("gpu_names") or []))
    fig.suptitle(f"{Path(str(meta.get('model', '?'))).name}, {meta.get('requests_per_gpu', '?')} requests per GPU"
                 + (f" ({', '.join(names)})" if names else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="plot bench/scaling.py results")
    p.add_argument("json", nargs="+")
    p.add_argument("-o", "--out", default="scaling.png")
    p.add_argument("--markdown", default=None, help="also write the merged tables here")
    args = p.parse_args(argv)
    data = merge(args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(data))
        print(f"wrote {args.markdown}")
    plot(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
