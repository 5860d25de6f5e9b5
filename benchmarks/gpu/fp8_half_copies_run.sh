#!/usr/bin/env bash
# One device call: the scaled float16 copies of the rows read by the FP8 one-row GEMVs (INFERNEO_FP8_HALF_COPIES).
# First fp8_half_copies_check.py (Llama-2-7B's norm and GEMVs with and without the copies, bit for bit; a tiny FP8
# engine with the switch on and off), then quant_suite.py in one process: bf16, FP8 + FP8 KV and W4A16 + FP8 KV as
# shipped at batch 1, then FP8 + FP8 KV with the switch on and as shipped in alternating rounds, and bf16 again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/fp8_half_copies_run.sh
# (SUITE_EXTRA: more quant_suite.py arguments, e.g. "--profile fp8+fp8kv --profile-batches 1")
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-170} python3 benchmarks/gpu/fp8_half_copies_check.py --out "$OUT/fp8_half_copies_check.jsonl" \
  > "$OUT/fp8_half_copies_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|HALF COPIES|rror" "$OUT/fp8_half_copies_check.log" | cut -c1-400
on="INFERNEO_FP8_HALF_COPIES=1"
ARGS=()
for round in $(seq 1 ${ROUNDS:-3}); do
  ARGS+=(--ab "fp8-copies-$round@fp8+fp8kv@$on" --ab "fp8-shipped-$round@fp8+fp8kv")
done
timeout ${SUITE_TIMEOUT:-300} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-285} --workloads "" \
  --decode-batches 1 --ab-batches 1 "${ARGS[@]}" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast${SKIP_EXTRA:-} \
  ${SUITE_EXTRA:-} --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-160
rm -rf "$OUT/quant/models"
