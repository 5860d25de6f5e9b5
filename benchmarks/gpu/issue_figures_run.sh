#!/usr/bin/env bash
# One device call for issues 19's and 20's decode figures with every default as shipped, on whichever card comes
# (the issues name an H200; an H100's figures are recorded as such):
#   1. moe_suite.py --decode-only: Qwen3-30B-A3B bf16, the batch-1 and batch-32 steps against their floors;
#   2. quant_suite.py: bf16, FP8 + FP8 KV and W4A16 + FP8 KV decode steps at batches 1 and 32 in one process, the
#      W4A16 + FP8 KV and bf16 batch-1 steps profiled (critical path by kernel).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/issue_figures_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant" "$OUT/moe"
timeout ${MOE_TIMEOUT:-210} python3 benchmarks/gpu/moe_suite.py --decode-only --deadline ${MOE_DEADLINE:-190} \
  --out "$OUT/moe" > "$OUT/moe/moe_suite.out" 2>&1
echo "moe_suite rc=$?"; grep -E "decode batch|need|rror" "$OUT/moe/moe_suite.out" | grep -vE "^ {4,}[0-9]" | tail -8
timeout ${SUITE_TIMEOUT:-250} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-230} --workloads "" \
  --decode-batches 1,32 --profile w4a16+fp8kv,bf16 --profile-batches 1 \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|critical|==|need|rror" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}[0-9]" | cut -c1-500 | tail -30
rm -rf "$OUT/quant/models" "$OUT/moe/models"
