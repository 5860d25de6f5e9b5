#!/usr/bin/env bash
# One device call after the FP8 cache's narrow decode tiles (triton_attention.narrow_fp8_decode_tiles) were made the
# default (docs/benchmarks.md, "The decode launch for an FP8 cache at 32 requests"):
#   1. quant_suite.py: bf16, FP8, W4A16, FP8 + FP8 KV and W4A16 + FP8 KV decode steps at batches 1 and 32 with every
#      default as shipped, then both FP8-KV variants at batch 32 again with the old launch (64-token tiles, 4 warps)
#      through INFERNEO_DECODE_LAUNCH, in the same process;
#   2. on an H200 only (MOE=0 leaves it out): moe_suite.py --decode-only, issue 19's batch-1 and batch-32 steps.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/fp8_narrow_confirm.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant" "$OUT/moe"
old="INFERNEO_DECODE_LAUNCH=block_n=64,num_warps=4"
timeout ${SUITE_TIMEOUT:-260} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-240} --workloads "" \
  --decode-batches 1,32 --ab-batches 32 --ab "fp8+fp8kv-oldlaunch@fp8+fp8kv@$old" \
  --ab "w4a16+fp8kv-oldlaunch@w4a16+fp8kv@$old" \
  --skip fp8-w8a8,fp8-nonorm,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | grep -E "decode batch|need|==" | tail -40
if [ "${MOE:-1}" != 0 ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout ${MOE_TIMEOUT:-250} python3 benchmarks/gpu/moe_suite.py --decode-only --deadline ${MOE_DEADLINE:-230} \
    --out "$OUT/moe" > "$OUT/moe/moe_suite.out" 2>&1
  echo "moe_suite rc=$?"; grep -vE "^ {4,}" "$OUT/moe/moe_suite.out" | tail -25
fi
