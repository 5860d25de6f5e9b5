#!/usr/bin/env bash
# One device call for the W4A16 tensor-core kernel under programmatic dependent launch (INFERNEO_W4A16_TC_PDL:
# wait (default), early, off):
#   1. w4a16_tc_pdl_check.py --engine: every Llama-2-7B layer at ROWS rows, the PDL modes against the plain launch
#      (bit-equal outputs, eager and from a graph; within tolerance of F.linear), the three modes' times in a
#      norm + W4A16 graph chain, and a tiny AWQ Llama's greedy tokens and logprobs in each mode equal to the plain
#      launch's (24 prompts together: the tensor-core kernel under PDL in CUDA graphs; PDL above 16 rows only);
#   2. quant_suite.py: bf16, W4A16, W4A16 + FP8 KV and FP8 + FP8 KV decode steps at DECODE batches as shipped, then
#      at AB batches W4A16 + FP8 KV with the modes off and early, as shipped again, and bf16 again, one process.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_tc_pdl_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-200} python3 benchmarks/gpu/w4a16_tc_pdl_check.py --rows ${ROWS:-32} --engine \
  --out "$OUT/tc_pdl_check.jsonl" > "$OUT/tc_pdl_check.log" 2>&1
echo "w4a16_tc_pdl_check rc=$?"; grep -E "^rows|FAILED|passed|Error|error|engine" "$OUT/tc_pdl_check.log" | tail -12
grep -E '^\{"layer' "$OUT/tc_pdl_check.log" | python3 -c "
import json, sys
for l in sys.stdin:
    d = json.loads(l); print(f\"{d['layer']:>13} {d['rows']:>3}: off {d['off_us']:.2f} early {d['early_us']:.2f} wait {d['wait_us']:.2f} off {d['off_again_us']:.2f} ok {d['ok']}\")"
off="INFERNEO_W4A16_TC_PDL=off"; early="INFERNEO_W4A16_TC_PDL=early"
timeout ${SUITE_TIMEOUT:-360} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-340} --workloads "" \
  --decode-batches ${DECODE:-1,16,32} --ab-batches ${AB:-16,32} \
  --ab "w4kv-off@w4a16+fp8kv@$off" --ab "w4kv-early@w4a16+fp8kv@$early" --ab "w4kv-again@w4a16+fp8kv" \
  --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-200
rm -rf "$OUT/quant/models"
