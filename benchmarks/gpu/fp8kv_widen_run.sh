#!/usr/bin/env bash
# One device call (2026-12-06): the FP8 KV cache's float16 dots (INFERNEO_FP8_KV_WIDEN=2: e4m3 tiles converted by
# the hardware, queries to float16) with the narrow decode tiles the cache now takes at 32 requests, against the
# default widening, for issue 20's batch-32 W4A16 + FP8 KV step:
#   1. decode_launch_sweep.py at 32 x 1,040 for widenings 0 and 2 (each launch checked against its default's output);
#   2. quant_suite.py: bf16, FP8 + FP8 KV and W4A16 + FP8 KV decode steps at batches 1 and 32, then both FP8-KV
#      variants with widening 2 (and the sweep's best widening-2 launch, when one beat its default), then the
#      default again, in one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/fp8kv_widen_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/sweep" "$OUT/quant"
timeout ${SWEEP_TIMEOUT:-150} python3 benchmarks/gpu/decode_launch_sweep.py --out "$OUT/sweep" --shapes 32x1040 \
  --caches fp8:0,fp8:2 > "$OUT/sweep/sweep.log" 2>&1
echo "sweep rc=$?"; cut -c1-400 "$OUT/sweep/sweep.log" | tail -6
touch "$OUT/sweep/best_launch.txt"; cat "$OUT/sweep/best_launch.txt"
# the sweep's best widening-2 launch, only where it beat the default by over 1% (a launch that forbids splits
# would otherwise run the batch-1 rows unsplit, as this script's first run did)
knob=$(awk '$1 == "32x1040" && $2 == "fp8" && $3 == 2 && $5 > 1.01 {print $4}' "$OUT/sweep/best_launch.txt")
w2="INFERNEO_FP8_KV_WIDEN=2"
[ -n "$knob" ] && w2="$w2@INFERNEO_DECODE_LAUNCH=$knob"
timeout ${SUITE_TIMEOUT:-330} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-310} --workloads "" \
  --decode-batches 1,32 --ab-batches 1,32 \
  --ab "w4kv-widen2@w4a16+fp8kv@$w2" --ab "fp8kv-widen2@fp8+fp8kv@$w2" \
  --ab "w4kv-again@w4a16+fp8kv" --ab "fp8kv-again@fp8+fp8kv" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
