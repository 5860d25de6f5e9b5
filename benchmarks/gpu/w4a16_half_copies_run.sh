#!/usr/bin/env bash
# One device call: the float16 copies of the bfloat16 rows between the W4A16 h2 GEMVs (INFERNEO_W4A16_HALF_COPIES).
# First w4a16_half_copies_check.py (Llama-2-7B's launches with and without the copies, bit for bit; a tiny AWQ
# engine with the switch on and off), then quant_suite.py in one process: bf16 and W4A16 + FP8 KV as shipped at
# batch 1, then the switch on and as shipped in alternating rounds, two decode-attention launches with the switch
# on (128-token tiles in place of 64, with 4 and 2 warps: one tile a split for the FP8 cache), and bf16 again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_half_copies_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-170} python3 benchmarks/gpu/w4a16_half_copies_check.py --out "$OUT/half_copies_check.jsonl" \
  > "$OUT/half_copies_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|HALF COPIES|rror" "$OUT/half_copies_check.log" | cut -c1-400
on="INFERNEO_W4A16_HALF_COPIES=1"
ARGS=()
for round in 1 2 3; do
  ARGS+=(--ab "copies-$round@w4a16+fp8kv@$on" --ab "shipped-$round@w4a16+fp8kv")
done
ARGS+=(--ab "copies-dec128w4@w4a16+fp8kv@$on@INFERNEO_DECODE_LAUNCH=block_n=128+num_warps=4+num_splits=16"
       --ab "copies-dec128w2@w4a16+fp8kv@$on@INFERNEO_DECODE_LAUNCH=block_n=128+num_warps=2+num_splits=16")
timeout ${SUITE_TIMEOUT:-300} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-285} --workloads "" \
  --decode-batches 1 --ab-batches 1 "${ARGS[@]}" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-160
rm -rf "$OUT/quant/models"
