#!/usr/bin/env bash
# One device call: the batch-1 decode attention's launch with an FP8 cache, A/B'd in the engine (issue 20's
# batch-1 steps). quant_suite.py: bf16 and W4A16 + FP8 KV decode steps at batch 1 as shipped (64-token
# tiles, 2 warps, 16 splits of a 2,048-token table), then W4A16 + FP8 KV with INFERNEO_DECODE_LAUNCH set to each of
# the launches below, then as shipped again, in one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/decode_b1_launch_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
launches=(num_splits=32 block_n=32+num_splits=32 num_warps=4 num_splits=8)
ab=()
for launch in "${launches[@]}"; do
  ab+=(--ab "w4kv-${launch//[=+]/_}@w4a16+fp8kv@INFERNEO_DECODE_LAUNCH=${launch//+/,}")
done
timeout ${SUITE_TIMEOUT:-170} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-160} --workloads "" \
  --decode-batches 1 --ab-batches 1 "${ab[@]}" --ab "w4kv-again@w4a16+fp8kv" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,fp8+fp8kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror|x bf16" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
rm -rf "$OUT/quant/models"
