#!/usr/bin/env bash
# One device call after the FP8 cache's widening rule (triton_attention.default_fp8_widen: float16 dots in decode)
# and the rotary kernel's KV store became defaults:
#   on an H200: spec_graphs_run.sh (issue 19's and 20's figures through fp8_narrow_confirm.sh, then the speculation
#     checks with the time left);
#   elsewhere: quant_suite.py, bf16, FP8 + FP8 KV and W4A16 + FP8 KV decode steps at batches 1 and 32 as shipped,
#     then both FP8-KV variants with the old widening everywhere (INFERNEO_FP8_KV_WIDEN=0), then as shipped again,
#     in one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/widen_confirm_run.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  CALL_SECONDS=${CALL_SECONDS:-540} bash benchmarks/gpu/spec_graphs_run.sh
  exit
fi
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
old="INFERNEO_FP8_KV_WIDEN=0"
timeout ${SUITE_TIMEOUT:-400} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-380} --workloads "" \
  --decode-batches 1,32 --ab-batches 1,32 \
  --ab "w4kv-widen0@w4a16+fp8kv@$old" --ab "fp8kv-widen0@fp8+fp8kv@$old" \
  --ab "w4kv-again@w4a16+fp8kv" --ab "fp8kv-again@fp8+fp8kv" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
rm -rf "$OUT/quant/models"
