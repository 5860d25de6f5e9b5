#!/usr/bin/env bash
# One device call for the W4A16 row layout's float16 scales (int4_layouts.compact_scales):
#   1. int4_check.py --rows 1,32 --quick (no table written): the Triton kernels on Llama-2-7B's shapes, their scales
#      float16 as the engine now holds them, checked against float32 F.linear;
#   2. w4a16_h2_e2e.py: tiny AWQ / GPTQ checkpoints through the engine against the older kernels and the reference;
#   3. quant_suite.py: bf16, W4A16 and W4A16 + FP8 KV decode steps at batches 1 and 32, then both W4A16 sections
#      with float32 scales (INFERNEO_INT4_FLOAT32_SCALES=1), then as shipped again, in one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_scales_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/check" "$OUT/quant"
timeout ${CHECK_TIMEOUT:-150} python3 benchmarks/gpu/int4_check.py --rows 1,32 --quick --out "$OUT/check" \
  > "$OUT/check/int4_check.log" 2>&1
echo "int4_check rc=$?"; grep -E "^(best linear|all|FAILED|layer set)" "$OUT/check/int4_check.log" | cut -c1-160
timeout 200 python3 benchmarks/gpu/w4a16_h2_e2e.py --out "$OUT/e2e.jsonl" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$?"; tail -2 "$OUT/e2e.log"
f32="INFERNEO_INT4_FLOAT32_SCALES=1"
timeout ${SUITE_TIMEOUT:-260} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-250} --workloads "" \
  --decode-batches 1,32 --ab-batches 1,32 \
  --ab "w4a16-f32scales@w4a16@$f32" --ab "w4kv-f32scales@w4a16+fp8kv@$f32" \
  --ab "w4a16-again@w4a16" --ab "w4kv-again@w4a16+fp8kv" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror|x bf16" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
rm -rf "$OUT/quant/models"
