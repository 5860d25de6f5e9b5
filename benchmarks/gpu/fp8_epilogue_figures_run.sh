#!/usr/bin/env bash
# One device call: the FP8 norm epilogues' engine check against the float32 model on the same de-quantized weights
# (fp8_norm_epilogue_check.py), then issue 20's decode figures in one quant_suite.py process (bf16, FP8 + FP8 KV and
# W4A16 + FP8 KV at batches 1 and 32, as shipped) with the epilogues A/B'd at batch 1 in alternating rounds.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/fp8_epilogue_figures_run.sh
# (ROUNDS, CHECK_TIMEOUT, SUITE_TIMEOUT, SUITE_DEADLINE shorten it; SUITE_EXTRA: more quant_suite.py arguments)
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-150} python3 benchmarks/gpu/fp8_norm_epilogue_check.py --out "$OUT/fp8_norm_epilogue_check.jsonl" \
  > "$OUT/fp8_norm_epilogue_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|NORM EPILOGUE|rror" "$OUT/fp8_norm_epilogue_check.log" | cut -c1-600
ARGS=()
for round in $(seq 1 ${ROUNDS:-3}); do
  ARGS+=(--ab "fp8-epi-$round@fp8+fp8kv@INFERNEO_FP8_NORM_EPILOGUE=1" --ab "fp8-shipped-$round@fp8+fp8kv")
done
timeout ${SUITE_TIMEOUT:-330} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-315} --workloads "" \
  --decode-batches 1,32 --ab-batches 1 "${ARGS[@]}" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  ${SUITE_EXTRA:-} --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror|need" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-400
rm -rf "$OUT/quant/models"
