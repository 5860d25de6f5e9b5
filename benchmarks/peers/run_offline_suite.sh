#!/usr/bin/env bash
# The offline-throughput comparison, one engine per process, all on the same workload (see
# benchmarks/README.md). Run it on a quiet machine; each run appends one JSON line to OUT, its log goes
# to OUT's name with .log, and a table of everything in OUT is printed at the end.
#
#   bash benchmarks/peers/run_offline_suite.sh [OUT] [VLLM_VENV]
#
# WORKLOAD overrides the workload flags, e.g. WORKLOAD="--num-requests 4 --output-len 4:8" for a smoke run.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT="${1:-scratch/offline_throughput.jsonl}"
VENV="${2:-scratch/vllm-venv}"
WORKLOAD="${WORKLOAD:---num-requests 64 --prompt-len 16:128 --output-len 16:128 --seed 0}"
LOG="${OUT%.jsonl}.log"
B=benchmarks/offline_throughput.py
failed=0

run() {  # run PYTHON ARGS...: one engine; a failure is reported and the suite goes on
    local py="$1"; shift
    echo "== $py $B $* $WORKLOAD" | tee -a "$LOG"
    # shellcheck disable=SC2086  # WORKLOAD is a list of flags
    if ! "$py" "$B" "$@" $WORKLOAD --out "$OUT" >>"$LOG" 2>&1; then
        echo "FAILED (see $LOG)"; failed=$((failed + 1))
    fi
}

run python3 --engine hf --dtype float32 --hf-batch-size 8
run python3 --engine hf --dtype float32 --hf-batch-size 16
run python3 --engine hf --dtype float32 --hf-batch-size 32
run python3 --engine hf --dtype bfloat16 --hf-batch-size 32
run "$VENV/bin/python" --engine vllm --dtype float32
run "$VENV/bin/python" --engine vllm --dtype bfloat16
run python3 --engine inferneo --dtype float32
run python3 --engine inferneo --dtype bfloat16

python3 benchmarks/peers/summarize.py "$OUT"
exit "$failed"
