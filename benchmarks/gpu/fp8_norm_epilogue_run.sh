#!/usr/bin/env bash
# One device call: the RMSNorm in the epilogues of the FP8 one-row GEMVs (INFERNEO_FP8_NORM_EPILOGUE), alone and with
# the scaled float16 copies (INFERNEO_FP8_HALF_COPIES). First fp8_norm_epilogue_check.py (Llama-2-7B's producers bit
# for bit against the plain launch + add, readers against float32, the copies the same bits; a tiny FP8 engine with
# the switch off and on), then quant_suite.py in one process: bf16, FP8 + FP8 KV as shipped at batch 1, then in
# alternating rounds the epilogues, the epilogues with the copies, the copies alone and as shipped, and bf16 again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/fp8_norm_epilogue_run.sh
# (ROUNDS, CHECK_TIMEOUT, SUITE_TIMEOUT, SUITE_DEADLINE shorten it; SUITE_EXTRA: more quant_suite.py arguments)
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-170} python3 benchmarks/gpu/fp8_norm_epilogue_check.py --out "$OUT/fp8_norm_epilogue_check.jsonl" \
  > "$OUT/fp8_norm_epilogue_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|NORM EPILOGUE|rror" "$OUT/fp8_norm_epilogue_check.log" | cut -c1-500
epi="INFERNEO_FP8_NORM_EPILOGUE=1"
copies="INFERNEO_FP8_HALF_COPIES=1"
ARGS=()
for round in $(seq 1 ${ROUNDS:-3}); do
  ARGS+=(--ab "fp8-epi-$round@fp8+fp8kv@$epi" --ab "fp8-epi-copies-$round@fp8+fp8kv@$epi@$copies"
         --ab "fp8-copies-$round@fp8+fp8kv@$copies" --ab "fp8-shipped-$round@fp8+fp8kv")
done
timeout ${SUITE_TIMEOUT:-330} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-315} --workloads "" \
  --decode-batches 1 --ab-batches 1 "${ARGS[@]}" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,w4a16+fp8kv,gptfast \
  ${SUITE_EXTRA:-} --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror|critical path" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-400
rm -rf "$OUT/quant/models"
