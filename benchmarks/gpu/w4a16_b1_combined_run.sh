#!/usr/bin/env bash
# One device call: the best single-field changes of the in-engine W4A16 one-row sweep (w4a16_b1_launch_sweep_run.sh)
# taken together, A/B'd against the shipped launches in alternating rounds (W4A16 + FP8 KV, batch 1, bf16 beside
# it; quant_suite.py in one process), and the same step with float16 activations (AWQ checkpoints' dtype; the dense
# model in float16 beside it), then issue 19's and 20's figures as shipped (issue_figures_run.sh).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_b1_combined_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/combined"
COMBO='{"linear,1,4096,4096,128":{"block_n":16},"linear,1,12288,4096,128":{"num_stages":3},"linear,1,22016,4096,128":{"block_n":8}}'
COMBO_O1='{"linear,1,4096,4096,128":{"block_n":16,"num_stages":1},"linear,1,12288,4096,128":{"num_stages":3},"linear,1,22016,4096,128":{"block_n":8}}'
ARGS=()
for round in 1 2 3; do
  ARGS+=(--ab "combo-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$COMBO" --ab "combo-o1stage-$round@w4a16+fp8kv@INFERNEO_W4A16_CONFIGS=$COMBO_O1"
         --ab "f16-$round@w4a16-f16+fp8kv" --ab "shipped-$round@w4a16+fp8kv")
done
ARGS+=(--ab "f16-dense@f16")
timeout ${SUITE_TIMEOUT:-260} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-245} --workloads "" \
  --decode-batches 1 --ab-batches 1 "${ARGS[@]}" --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/combined" > "$OUT/combined/quant_suite.out" 2>&1
echo "combined quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/combined/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-160
rm -rf "$OUT/combined/models"
[ "${FIGURES:-1}" = 1 ] && bash benchmarks/gpu/issue_figures_run.sh
