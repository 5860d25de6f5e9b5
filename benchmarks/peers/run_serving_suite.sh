#!/usr/bin/env bash
# The online-serving comparison (issue: server overhead), vLLM's CPU server and Inferneo's, one after the other on
# this machine, same model weights (fp32), same requests; plus each engine offline on scenario (b)'s requests, for
# the online/offline ratios. Each server runs each scenario REPEAT times (default 3) and the summary compares
# medians, because single runs on a small shared machine spread by about 5%. Each round starts both servers
# afresh. Run it on a quiet machine:
#
#   bash benchmarks/peers/run_serving_suite.sh [OUT] [VLLM_VENV]
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT="${1:-scratch/serving.jsonl}"
VENV="${2:-scratch/vllm-venv}"
HF_MODEL="${HF_MODEL:-scratch/smollm2-hf}"
LOG="${OUT%.jsonl}.log"
REPEAT="${REPEAT:-3}"
failed=0

wait_ready() {  # wait_ready PORT: until /v1/models answers (vLLM compiles at start-up: up to 5 minutes)
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0
        sleep 1
    done
    return 1
}

scenarios() {  # scenarios PORT LABEL: (a) then (b)
    for s in a b; do
        python3 benchmarks/serving_throughput.py --base-url "http://127.0.0.1:$1" --scenario "$s" \
            --label "$2" --out "$OUT" >>"$LOG" 2>&1 || { echo "FAILED $2 scenario $s"; failed=$((failed + 1)); }
    done
}

# Every round starts each server afresh: a server that has already seen (b)'s prompts would answer them from its
# prefix cache.
for _ in $(seq 1 "$REPEAT"); do
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
    sleep 2
done

# Each engine offline on scenario (b)'s requests (same workload hash), REPEAT times, for the online/offline ratios.
for _ in $(seq 1 "$REPEAT"); do
    python3 benchmarks/offline_throughput.py --engine inferneo --dtype float32 --num-requests 128 \
        --prompt-len 64:64 --output-len 64:64 --seed 0 --max-model-len 256 --out "$OUT" >>"$LOG" 2>&1 \
        || failed=$((failed + 1))
    "$VENV/bin/python" benchmarks/offline_throughput.py --engine vllm --dtype float32 --num-requests 128 \
        --prompt-len 64:64 --output-len 64:64 --seed 0 --max-model-len 256 --out "$OUT" >>"$LOG" 2>&1 \
        || failed=$((failed + 1))
done

python3 benchmarks/peers/serving_summary.py "$OUT"
exit "$failed"
