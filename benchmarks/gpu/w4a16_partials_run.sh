#!/usr/bin/env bash
# One device call (2026-12-07): the W4A16 + FP8 KV batch-1 step with the epilogue producers (o, down) in 16-row
# tiles (half the partial sums of squares for the readers to load) or the gate/up reader in 8-row tiles, through
# INFERNEO_W4A16_CONFIGS, in two alternating rounds beside the shipped tilings and bf16.
# (Run against the tiling table of b87b521, whose o entry was 8 rows of 4 warps; the commit after it ships o16.)
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_partials_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/w4"
O16='{"linear,1,4096,4096,128":{"block_n":16,"num_warps":8}}'
D16='{"linear,1,4096,11008,128":{"block_n":16,"num_warps":8}}'
OD16='{"linear,1,4096,4096,128":{"block_n":16,"num_warps":8},"linear,1,4096,11008,128":{"block_n":16,"num_warps":8}}'
GU8='{"linear,1,22016,4096,128":{"block_n":8,"num_warps":4}}'
ARGS=()
for round in 1 2; do
  ARGS+=(--ab "w4-o16-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$O16" --ab "w4-d16-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$D16"
         --ab "w4-od16-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$OD16" --ab "w4-gu8-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$GU8"
         --ab "w4-shipped-$round@w4a16+fp8kv")
done
timeout 300 python3 benchmarks/gpu/quant_suite.py --deadline 290 --workloads "" --decode-batches 1 --ab-batches 1 "${ARGS[@]}" \
  --skip fp8,fp8+fp8kv,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/w4" > "$OUT/w4/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/w4/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-200
rm -rf "$OUT/w4/models"
