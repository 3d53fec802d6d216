#!/usr/bin/env bash
# One-GPU measurements of the reshaped core, its server and its routing, in parts that each fit
# a 10-minute call. On the GPU machine, from the project's root, where vLLM imports and
# $MPDP_GPU_MODELS names the folder of model configs (qwen3-8b-shape/, smol/):
#
#   scripts/gpu_session.sh OUT_DIR core     GPU tests; scaling bare vs mpdp1 (8B shape, fixed)
#   scripts/gpu_session.sh OUT_DIR prefix   bench/prefix.py: two vLLM workers sharing the GPU
#   scripts/gpu_session.sh OUT_DIR ceiling  docqa: cache_aware beside pure affinity and least_loaded
#   scripts/gpu_session.sh OUT_DIR serve    mpdp serve vs vllm serve (SmolLM2 shape)
#   scripts/gpu_session.sh OUT_DIR recovery two vLLM workers on one GPU, one SIGKILLed mid-run
#   scripts/gpu_session.sh OUT_DIR ray      vLLM through the Ray launcher vs the local one (Ray on loopback)
#   scripts/gpu_session.sh OUT_DIR batch    the adaptive batch limit vs bare vLLM at its defaults and at 512
#   scripts/gpu_session.sh OUT_DIR batch-check  one pool engine: adaptive, fixed 512, off (~5 minutes)
#   scripts/gpu_session.sh OUT_DIR kv-events  the mirror beside both KV-event versions (8B shape, < 9 minutes)
#   scripts/gpu_session.sh OUT_DIR sweep    bare at its defaults and at 512, mpdp adaptive and fixed 512 (< 10 min)
#   scripts/gpu_session.sh OUT_DIR loads    the batch limit vs the old credit on light, DSPy, prefill, mixed and
#                                           served loads; then bare at 256 (and 768) if time is left (< 10 min)
#   scripts/gpu_session.sh OUT_DIR kv-events2  the mirror beside the event index, sticky and not, on six loads (< 8 min)
#   scripts/gpu_session.sh OUT_DIR serve-split vllm serve at its defaults and at mpdp's engine settings, then mpdp
#                                           serve (8B shape, 512 streams; ~2.5 min a server: MPDP_SPLIT="a b" picks)
set -uo pipefail
out=${1:?usage: scripts/gpu_session.sh OUT_DIR PART (see the comment above)}
part=${2:?part: core, prefix, ceiling, serve, recovery, ray, batch, batch-check, kv-events, sweep, loads, kv-events2 or serve-split}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
big=$MPDP_GPU_MODELS/qwen3-8b-shape
smol=$MPDP_GPU_MODELS/smol
gib=$((1024 * 1024 * 1024))

case $part in
core)
  timeout 240 python3 -m pytest -m gpu tests/test_vllm_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
  timeout 330 python3 -m bench.scaling --model "$big" --variants bare:fixed,mpdp1:fixed --requests-per-gpu 512 \
    --fixed-len 512 --budget-s 320 --json "$out/scaling.json" 2>&1 | tail -40 > "$out/scaling.log"
  ;;
prefix)
  # Two engines on one GPU: each a fixed KV cache (and a memory share that leaves room for both).
  timeout 580 python3 -m bench.prefix --engine vllm --model "$big" --load-format dummy --gpus 0,0 \
    --gpu-memory-utilization 0.45 --kv-cache-memory-bytes $((20 * gib)) --policies least_loaded,cache_aware \
    --workloads docqa,gepa64,random,gepa8,skew --rounds 2 --budget-s 480 \
    --json "$out/prefix.json" 2>&1 | tail -60 > "$out/prefix.log"
  ;;
ceiling)
  # docqa beside pure affinity (prefix_affinity with a slack no load reaches): what routing can win there.
  timeout 400 python3 -m bench.prefix --engine vllm --model "$big" --load-format dummy --gpus 0,0 \
    --gpu-memory-utilization 0.45 --kv-cache-memory-bytes $((20 * gib)) \
    --policies least_loaded,prefix_affinity:slack=1000000000,cache_aware --workloads docqa --rounds 2 \
    --json "$out/ceiling.json" 2>&1 | tail -20 > "$out/ceiling.log"
  ;;
serve)
  port=8011
  # The same engine settings on both sides (vllm serve's API context defaults to fewer sequences).
  opts=(--engine-option load_format=dummy --engine-option enforce_eager=true --engine-option max_num_seqs=256
        --engine-option gpu_memory_utilization=0.4 --engine-option max_model_len=2048)
  load="--model smol --concurrency 256 --requests 2048 --max-tokens 128 --procs ${MPDP_CLIENT_PROCS:-8}"
  for server in ${MPDP_SERVE_ORDER:-vllm mpdp}; do
    if [ $server = vllm ]; then
      python3 -m vllm.entrypoints.openai.api_server --model "$smol" --served-model-name smol --load-format dummy \
        --enforce-eager --max-num-seqs 256 --gpu-memory-utilization 0.4 --max-model-len 2048 \
        --host 127.0.0.1 --port $port \
        > "$out/server-$server.log" 2>&1 &
    else
      python3 -m mpdp.cli serve --engine vllm --model "$smol" --served-model-name smol --num-gpus 1 "${opts[@]}" \
        --host 127.0.0.1 --port $port > "$out/server-$server.log" 2>&1 &
    fi
    pid=$!
    for _ in $(seq 180); do curl -sf http://127.0.0.1:$port/v1/models >/dev/null && break; sleep 1; done
    timeout 150 python3 -m bench.serve_vs_vllm --base-url http://127.0.0.1:$port/v1 $load \
      --json "$out/serve-$server.json" 2>&1 | tail -20 > "$out/serve-$server.txt"
    # The same load from a client that parses no event: the httpx one can be the slower side.
    timeout 90 python3 -m bench.serve_vs_vllm --base-url http://127.0.0.1:$port/v1 $load --client light \
      --json "$out/serve-$server-light.json" 2>&1 | tail -20 > "$out/serve-$server-light.txt"
    kill -INT $pid; wait $pid
  done
  ;;
recovery)
  timeout 200 python3 -m bench.recovery --engine vllm --model "$smol" --gpus 0,0 --rounds 1 \
    --kv-cache-memory-bytes $((4 * gib)) --json "$out/recovery.json" 2>&1 | tail -30 > "$out/recovery.log"
  ;;
ray)
  # SmolLM2's shape, eager: the engine is fast, so what the launcher and its TCP + Curve path cost shows.
  timeout 400 python3 -m bench.ray_overhead --engine vllm --model "$smol" --requests 2048 --max-tokens 256 \
    --order "${MPDP_RAY_ORDER:-local,ray}" \
    --engine-options '{"load_format": "dummy", "enforce_eager": true, "gpu_memory_utilization": 0.4, "max_model_len": 2048}' \
    --json "$out/ray.json" 2>&1 | tail -30 > "$out/ray.log"
  ;;
batch)
  # 2,048 x 512 tokens, 8B shape, CUDA graphs: bare LLM.generate at its defaults and at max_num_seqs
  # 512, then mpdp (adaptive, then the old credit) on one engine, then 768 and 256 if time is left.
  timeout 540 python3 -m bench.batch_limit --model "$big" --requests 2048 --max-tokens 512 \
    --bare-sweep ${MPDP_BATCH_SWEEP:-512,768,256} --budget-s ${MPDP_BATCH_BUDGET:-515} \
    --json "$out/batch_limit.json" 2>&1 | tail -40 > "$out/batch_limit.log"
  ;;
batch-check)
  # The same load on one pool engine only: the controller beside a fixed 512 and the old credit.
  timeout 360 python3 -m bench.batch_limit --model "$big" --requests 2048 --max-tokens 512 --no-bare \
    --pool-fixed 512 --budget-s ${MPDP_BATCH_BUDGET:-340} \
    --json "$out/batch_check.json" 2>&1 | tail -40 > "$out/batch_check.log"
  ;;
kv-events)
  # Issue 25: 16 GiB of KV each, so that the tenants' working set is ~2.6x the pool's caches;
  # least_loaded, the mirror (cache_aware), the event index with pending claims, and without them
  # (the first version). Runs start until 440 s (the pool takes ~130 s to start); the JSON is
  # rewritten after each run, so a cut keeps what was measured.
  timeout 535 python3 -m bench.prefix --engine vllm --model "$big" --load-format dummy --gpus 0,0 \
    --gpu-memory-utilization 0.45 --kv-cache-memory-bytes $((16 * gib)) \
    --policies least_loaded,cache_aware,cache_aware:events=true,cache_aware:events=true+pending=false \
    --workloads tenants,docqa,random --rounds 1 --stream --budget-s 440 \
    --json "$out/prefix-kv-fixed.json" 2>&1 | tail -40 > "$out/prefix-kv-fixed.log"
  ;;
sweep)
  # Issue 26 in one run: bare at its defaults and at 512, then one pool engine: adaptive, fixed 512.
  timeout 590 python3 -m bench.batch_limit --model "$big" --requests 2048 --max-tokens 512 --bare-sweep 512 \
    --pool-modes adaptive --pool-fixed 512 --budget-s ${MPDP_BATCH_BUDGET:-560} \
    --json "$out/batch_sweep.json" 2>&1 | tail -40 > "$out/batch_sweep.log"
  ;;
loads)
  # Issue 26: where the controller has nothing to win it must not cost (one engine, both settings);
  # then the rest of the bare sweep in what is left of the call.
  timeout 360 python3 -m bench.batch_loads --model "$big" --budget-s ${MPDP_LOADS_BUDGET:-330} \
    --json "$out/batch_loads.json" > "$out/batch_loads.log" 2>&1
  left=$((585 - SECONDS))
  [ $left -gt 150 ] && timeout $left python3 -m bench.batch_limit --model "$big" --requests 2048 --max-tokens 512 \
    --no-bare-default --bare-sweep 256,768 --pool-modes none --budget-s $((left - 15)) \
    --json "$out/batch_sweep2.json" 2>&1 | tail -40 > "$out/batch_sweep2.log"
  ;;
kv-events2)
  # Issue 25: the mirror beside the event index, sticky (the default with events: the mirror's
  # affinity, the exact charge) and not (the exact index alone), on six loads, tenants first.
  timeout ${MPDP_KV_TIMEOUT:-450} python3 -m bench.prefix --engine vllm --model "$big" --load-format dummy --gpus 0,0 \
    --gpu-memory-utilization 0.45 --kv-cache-memory-bytes $((16 * gib)) \
    --policies cache_aware,cache_aware:events=true,cache_aware:events=true+sticky=false \
    --workloads tenants,chat,docqa,gepa8,gepa64,random \
    --rounds 1 --stream --budget-s ${MPDP_KV_BUDGET:-380} \
    --json "$out/prefix-kv2.json" 2>&1 | tail -40 > "$out/prefix-kv2.log"
  ;;
serve-split)
  # Issue 26: how much of mpdp serve's lead over vllm serve (both at their defaults) is engine
  # settings (mpdp's engines take LLM's offline defaults: 16,384 batched tokens, against the
  # server's 8,192; the batch limit keeps <= 512 running) and how much the front end.
  port=8012
  load="--model big --concurrency 512 --requests 2048 --max-tokens 256 --procs ${MPDP_CLIENT_PROCS:-8}"
  for server in ${MPDP_SPLIT:-vllm-default vllm-offline vllm-offline512 mpdp}; do
    case $server in
      vllm-default) extra=();;
      vllm-offline) extra=(--max-num-batched-tokens 16384);;
      vllm-offline512) extra=(--max-num-batched-tokens 16384 --max-num-seqs 512);;
    esac
    if [ $server = mpdp ]; then
      python3 -m mpdp.cli serve --engine vllm --model "$big" --served-model-name big --num-gpus 1 \
        --engine-option load_format=dummy --host 127.0.0.1 --port $port > "$out/split-$server.log" 2>&1 &
    else
      python3 -m vllm.entrypoints.openai.api_server --model "$big" --served-model-name big --load-format dummy \
        "${extra[@]}" --host 127.0.0.1 --port $port > "$out/split-$server.log" 2>&1 &
    fi
    pid=$!
    for _ in $(seq 240); do curl -sf http://127.0.0.1:$port/v1/models >/dev/null && break; sleep 1; done
    timeout 150 python3 -m bench.serve_vs_vllm --base-url http://127.0.0.1:$port/v1 $load \
      --json "$out/split-$server.json" 2>&1 | tail -20 > "$out/split-$server.txt"
    kill -INT $pid; wait $pid
  done
  ;;
*) echo "unknown part $part" >&2; exit 2;;
esac
ls -la "$out"
