#!/usr/bin/env bash
# The GPU run: vLLM engine tests, then the scaling benchmark. On the GPU machine, from the
# project's root, in an environment where vLLM imports and $MPDP_GPU_MODELS names the folder
# holding the benchmark model configs (qwen3-8b-shape/, smol/):
#
#   scripts/gpu_bench.sh OUT_DIR [all|test|bench|dspy] [bench.scaling or bench.dspy_eval flags ...]
#
#   all (default)  pytest -m gpu tests/test_vllm_gpu.py, then python3 -m bench.scaling with what is
#                  left of the time budget (MPDP_BENCH_BUDGET_S, default 560 s for the whole
#                  call, so that it fits a 10-minute job limit)
#   test           only the tests
#   bench          only the benchmark, e.g. the variants a first call had no time for:
#                  scripts/gpu_bench.sh OUT bench --variants mpdp1:fixed,mpdp2:fixed
#   dspy           only the DSPy program (python3 -m bench.dspy_eval with the flags given), e.g.
#                  scripts/gpu_bench.sh OUT dspy --variants mpdp4,server4 --threads 80,512,4096 --waves 2
#
# Writes into OUT_DIR: env.txt, pytest.log, scaling-N.json/.md/.log (N counts the calls),
# scaling-N-logs/ (one log per engine process), and scaling.png + scaling.md merged over every
# scaling-*.json there; the dspy part writes dspy_eval-N.json/.log and dspy_eval-N-logs/.
# The benchmarks skip what would overrun their budget (scaling.py prints the --variants that
# would measure the rest).
set -uo pipefail

out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [all|test|bench|dspy] [bench flags ...]}
part=${2:-all}
shift; [ $# -gt 0 ] && shift
case $part in all|test|bench|dspy) ;; *) echo "unknown part '$part' (all, test, bench or dspy)" >&2; exit 2;; esac

cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
export PYTHONUNBUFFERED=1
budget=${MPDP_BENCH_BUDGET_S:-560}
rc=0

{
  date; nvidia-smi || true
  python3 -c "import sys, torch, vllm, transformers; print(sys.version); print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
  env | grep -E '^(CUDA_VISIBLE_DEVICES|VLLM_|MPDP_|NCCL_)' | sort
} > "$out/env.txt" 2>&1

if [ "$part" = dspy ]; then
  n=1; while [ -e "$out/dspy_eval-$n.json" ]; do n=$((n + 1)); done
  left=$((budget - SECONDS))
  echo "== DSPy program, budget ${left}s ($(date +%T))"
  python3 -m bench.dspy_eval --json "$out/dspy_eval-$n.json" --log-dir "$out/dspy_eval-$n-logs" \
    --budget-s "$left" "$@" 2>&1 | tee "$out/dspy_eval-$n.log"
  rc=${PIPESTATUS[0]}
  echo "== done in ${SECONDS}s, exit $rc; results in $out"
  exit $rc
fi

if [ "$part" != bench ]; then
  echo "== tests ($(date +%T))"
  timeout 300 python3 -m pytest -m gpu tests/test_vllm_gpu.py -v -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
  test_rc=${PIPESTATUS[0]}
  [ "$test_rc" -ne 0 ] && rc=$test_rc && echo "== tests failed (exit $test_rc); going on with the benchmark"
fi

if [ "$part" != test ]; then
  n=1; while [ -e "$out/scaling-$n.json" ]; do n=$((n + 1)); done
  left=$((budget - SECONDS))
  echo "== benchmark, budget ${left}s ($(date +%T))"
  python3 -m bench.scaling --json "$out/scaling-$n.json" --budget-s "$left" "$@" 2>&1 | tee "$out/scaling-$n.log"
  bench_rc=${PIPESTATUS[0]}
  [ "$bench_rc" -ne 0 ] && rc=$bench_rc
  python3 -m bench.plot_scaling "$out"/scaling-*.json -o "$out/scaling.png" --markdown "$out/scaling.md" || true
fi
echo "== done in ${SECONDS}s, exit $rc; results in $out"
exit $rc
