#!/usr/bin/env bash
# One device call for the batch-32 step's two largest parts (docs/benchmarks.md, "W4A16 at 16 and 32 rows"):
#   1. w4a16_gluon.py (GLUON=0 leaves it out): the Gluon W4A16 kernel checked against F.linear and timed beside
#      the shipped tensor-core kernel at 16, 32 and 64 rows;
#   2. decode_launch_sweep.py at $SHAPES (default 32x1040,200x640) on $CACHES (default bf16:0,fp8:0): the decode
#      attention's launches;
#   3. quant_suite.py (SUITE=0 leaves it out): bf16, W4A16 + FP8 KV and FP8 + FP8 KV decode steps at batch 32, then each FP8-KV variant
#      again with INFERNEO_DECODE_LAUNCH set to the sweep's best FP8 launch at 32 x 1,040 (and bf16 with its best
#      bf16 launch), when one beat the default: the same process, the same weights.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/decode_launch_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/gluon" "$OUT/sweep" "$OUT/quant"
if [ "${GLUON:-1}" != 0 ]; then
  timeout ${GLUON_TIMEOUT:-130} python3 benchmarks/gpu/w4a16_gluon.py --out "$OUT/gluon" > "$OUT/gluon/gluon.log" 2>&1
  echo "gluon rc=$?"; grep -vE "^ {4,}" "$OUT/gluon/gluon.log" | tail -c 2500
fi
timeout ${SWEEP_TIMEOUT:-140} python3 benchmarks/gpu/decode_launch_sweep.py --out "$OUT/sweep" \
  --shapes ${SHAPES:-32x1040,200x640} --caches ${CACHES:-bf16:0,fp8:0} > "$OUT/sweep/sweep.log" 2>&1
echo "sweep rc=$?"; cut -c1-400 "$OUT/sweep/sweep.log" | tail -12
touch "$OUT/sweep/best_launch.txt"; cat "$OUT/sweep/best_launch.txt"
fp8=$(awk '$1 == "32x1040" && $2 == "fp8" && $3 == 0 {print $4}' "$OUT/sweep/best_launch.txt")
bf16=$(awk '$1 == "32x1040" && $2 == "bf16" {print $4}' "$OUT/sweep/best_launch.txt")
ab=()
[ -n "$fp8" ] && ab+=(--ab "w4a16+fp8kv-launch@w4a16+fp8kv@INFERNEO_DECODE_LAUNCH=$fp8"
                      --ab "fp8+fp8kv-launch@fp8+fp8kv@INFERNEO_DECODE_LAUNCH=$fp8")
[ -n "$bf16" ] && ab+=(--ab "bf16-launch@bf16@INFERNEO_DECODE_LAUNCH=$bf16")
[ "${SUITE:-1}" = 0 ] && exit 0
timeout ${SUITE_TIMEOUT:-240} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-230} --workloads "" \
  --decode-batches 32 --ab-batches 32 "${ab[@]}" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | tail -c 3000
