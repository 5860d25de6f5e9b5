#!/usr/bin/env bash
# One device call: the rotary embedding and KV store in the W4A16 q/k/v projection's epilogue
# (INFERNEO_W4A16_ROTARY_EPILOGUE=1) A/B'd at batch 1. First w4a16_rotary_epilogue_check.py (the launch bit for bit
# against the projection + rotary kernel on Llama-2-7B's q/k/v shape, FP8 and bf16 caches, eager and from a graph;
# tiny AWQ engines equal with and without), then quant_suite.py at batch 1 in one process: bf16 and W4A16 + FP8 KV
# as shipped, with the epilogue, as shipped again, with the epilogue again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_rotary_epilogue_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-150} python3 benchmarks/gpu/w4a16_rotary_epilogue_check.py ${CHECK_ARGS:-} \
  --out "$OUT/rotary_check.jsonl" > "$OUT/rotary_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|ROTARY|rror" "$OUT/rotary_check.log" | cut -c1-300
on="INFERNEO_W4A16_ROTARY_EPILOGUE=1"
timeout ${SUITE_TIMEOUT:-230} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-215} --workloads "" \
  --decode-batches 1 --ab-batches 1 \
  --ab "w4kv-rotary@w4a16+fp8kv@$on" --ab "w4kv-again@w4a16+fp8kv" --ab "w4kv-rotary-again@w4a16+fp8kv@$on" \
  --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|critical|rror" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-400
rm -rf "$OUT/quant/models"
