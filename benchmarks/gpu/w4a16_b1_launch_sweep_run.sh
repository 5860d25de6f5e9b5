#!/usr/bin/env bash
# One device call: the W4A16 one-row launches swept inside the engine (w4a16_b1_launch_sweep.py: one field of one
# of Llama-2-7B's four shapes at a time through INFERNEO_W4A16_CONFIGS), W4A16 + FP8 KV decode step at batch 1,
# bf16 beside it, the shipped launches measured after each shape's variants; quant_suite.py in one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_b1_launch_sweep_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
eval "set -- $(python3 benchmarks/gpu/w4a16_b1_launch_sweep.py)"
timeout ${SUITE_TIMEOUT:-430} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-410} --workloads "" \
  --decode-batches 1 --ab-batches 1 "$@" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-160
rm -rf "$OUT/quant/models"
