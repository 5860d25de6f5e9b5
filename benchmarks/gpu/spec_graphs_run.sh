#!/usr/bin/env bash
# One device call after draft verification became decode rows that replay CUDA graphs (step_inputs):
#   on an H200: fp8_narrow_confirm.sh first (issue 19's and 20's figures), then the speculation checks with the
#   time left; elsewhere: the speculation checks first, then the quantized decode steps (MOE=0).
#   speculation checks: spec_decode_graphs.py (Llama-2-7B architecture, draft step against plain step, graphs on
#   and off; the oracle end to end) and spec_decode_check.py (the parity model: float32 against HF, timings).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/spec_graphs_run.sh
source benchmarks/gpu/device_env.sh
start=$SECONDS
spec() {
  mkdir -p "$OUT/spec"
  timeout ${SPEC_TIMEOUT:-200} python3 benchmarks/gpu/spec_decode_graphs.py --out "$OUT/spec/spec_graphs.jsonl" \
    > "$OUT/spec/spec_graphs.log" 2>&1
  echo "spec_decode_graphs rc=$?"; grep -E '^\{|graphs' "$OUT/spec/spec_graphs.log" | tail -6
  timeout ${CHECK_TIMEOUT:-120} python3 benchmarks/gpu/spec_decode_check.py --rounds 2 \
    --out "$OUT/spec/spec_check.jsonl" > "$OUT/spec/spec_check.log" 2>&1
  echo "spec_decode_check rc=$?"; grep -E '^\{' "$OUT/spec/spec_check.log" | tail -5
}
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  SUITE_TIMEOUT=170 SUITE_DEADLINE=150 MOE_TIMEOUT=190 MOE_DEADLINE=170 bash benchmarks/gpu/fp8_narrow_confirm.sh
  left=$((${CALL_SECONDS:-480} - (SECONDS - start)))
  if [ $left -gt 100 ]; then SPEC_TIMEOUT=$((left - 10)) CHECK_TIMEOUT=1 spec; fi
else
  spec
  left=$((${CALL_SECONDS:-480} - (SECONDS - start)))
  if [ $left -gt 120 ]; then
    MOE=0 SUITE_TIMEOUT=$((left - 10)) SUITE_DEADLINE=$((left - 30)) bash benchmarks/gpu/fp8_narrow_confirm.sh
  fi
fi
