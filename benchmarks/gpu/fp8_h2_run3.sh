#!/usr/bin/env bash
# The third device call: the new defaults in one process (the h2 one-row FP8 tilings in fp8_gemv_configs.json;
# split decode attention merged in the attention kernel at batch 1), bf16 and FP8 decode steps at batch 1, 4 and
# 32, then both again at batch 1 and 4 with the merge off (INFERNEO_DECODE_FUSED_REDUCE=0) for the A/B.
# Usage: OUT=... bash benchmarks/gpu/fp8_h2_run3.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-45}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout $((DEADLINE + 10)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" \
  --decode-batches 1,4,32 --fused-reduce 0 --skip fp8-w8a8,fp8-nonorm,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast \
  --out "$OUT" > "$OUT/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant_suite.out" | tail -c 4000
