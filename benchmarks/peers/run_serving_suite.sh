#!/usr/bin/env bash
# The online-serving comparison (issue: server overhead), vLLM's CPU server and Inferneo's, one after the other on
# this machine, same model weights (fp32), same requests; plus each engine offline on scenario (b)'s requests, for
# the online/offline ratios. Run it on a quiet machine:
#
#   bash benchmarks/peers/run_serving_suite.sh [OUT] [VLLM_VENV]
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT="${1:-/work/scratch/serving.jsonl}"
VENV="${2:-/work/scratch/vllm-venv}"
HF_MODEL="${HF_MODEL:-/work/scratch/smollm2-hf}"
LOG="${OUT%.jsonl}.log"
failed=0

wait_ready() {  # wait_ready PORT: until /v1/models answers (vLLM compiles at start-up: up to 5 minutes)
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0
        sleep 1
    done
    return 1
}

scenarios() {  # scenarios PORT LABEL
    for s in a b; do
        python3 benchmarks/serving_throughput.py --base-url "http://127.0.0.1:$1" --scenario "$s" \
            --label "$2" --out "$OUT" >>"$LOG" 2>&1 || { echo "FAILED $2 scenario $s"; failed=$((failed + 1)); }
    done
}

# vLLM (CPU build) from its own venv, with the settings its CPU docs ask for.
preload="$VENV/preload/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$VENV/lib/libiomp5.so"
VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 LD_PRELOAD="$preload" \
    "$VENV/bin/python" benchmarks/peers/vllm_cli.py serve "$HF_MODEL" --dtype float32 --port 8100 \
    --max-model-len 256 >>"$LOG" 2>&1 &
vllm_pid=$!
if wait_ready 8100; then scenarios 8100 vllm-serve; else echo "vLLM server did not start"; failed=$((failed + 1)); fi
kill -INT "$vllm_pid" 2>/dev/null; wait "$vllm_pid" 2>/dev/null
sleep 5

# Inferneo on its default model (the same weights), fp32.
python3 -m inferneo.cli serve --dtype float32 --port 8200 --max-model-len 256 >>"$LOG" 2>&1 &
inf_pid=$!
if wait_ready 8200; then scenarios 8200 inferneo-serve; else echo "Inferneo server did not start"; failed=$((failed + 1)); fi
kill -TERM "$inf_pid" 2>/dev/null; wait "$inf_pid" 2>/dev/null

# Inferneo offline on scenario (b)'s requests (same workload hash) for the online/offline ratio.
python3 benchmarks/offline_throughput.py --engine inferneo --dtype float32 --num-requests 128 --prompt-len 64:64 \
    --output-len 64:64 --seed 0 --max-model-len 256 --out "$OUT" >>"$LOG" 2>&1 || failed=$((failed + 1))
# And vLLM offline on the same requests, for vLLM's own online/offline ratio on this machine.
"$VENV/bin/python" benchmarks/offline_throughput.py --engine vllm --dtype float32 --num-requests 128 \
    --prompt-len 64:64 --output-len 64:64 --seed 0 --max-model-len 256 --out "$OUT" >>"$LOG" 2>&1 \
    || failed=$((failed + 1))

python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    row = {k: r.get(k) for k in ("label", "engine", "scenario", "requests_per_s", "output_tok_per_s")}
    for name in ("ttft_s", "tpot_s"):
        if isinstance(r.get(name), dict):
            row[name] = {k: round(v, 4) for k, v in r[name].items() if isinstance(v, float)}
    print(row)
PY
exit "$failed"
