#!/usr/bin/env bash
# One device call, two batch-1 candidates A/B'd in the engine: the W4A16 gate/up + SiLU as one launch with gate/up
# row pairs (INFERNEO_W4A16_SILU_PAIRS=1) and decode attention asking L2 for its whole split before its PDL wait
# (INFERNEO_DECODE_PREFETCH_TILES=0). First w4a16_norm_epilogue_check.py --pairs-only (the pairs launch bit for
# bit against the projection + SiLU-and-mul kernel; tiny engines equal with and without), then quant_suite.py at
# batch 1 in one process: bf16 and W4A16 + FP8 KV as shipped, each candidate, then as shipped again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_b1_pairs_prefetch_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-80} python3 benchmarks/gpu/w4a16_norm_epilogue_check.py --pairs-only ${CHECK_ARGS:-} \
  --out "$OUT/pairs_check.jsonl" > "$OUT/pairs_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|EPILOGUE|rror" "$OUT/pairs_check.log" | cut -c1-400
pairs="INFERNEO_W4A16_SILU_PAIRS=1"
split="INFERNEO_DECODE_PREFETCH_TILES=0"
timeout ${SUITE_TIMEOUT:-190} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-180} --workloads "" \
  --decode-batches 1 --ab-batches 1 \
  --ab "w4kv-pairs@w4a16+fp8kv@$pairs" --ab "w4kv-prefetch-split@w4a16+fp8kv@$split" --ab "w4kv-again@w4a16+fp8kv" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
rm -rf "$OUT/quant/models"
