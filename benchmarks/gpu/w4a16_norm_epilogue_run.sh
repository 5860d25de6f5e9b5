#!/usr/bin/env bash
# One device call: the RMSNorm in the W4A16 h2 GEMVs' epilogues (INFERNEO_W4A16_NORM_EPILOGUE, default on). First
# w4a16_norm_epilogue_check.py (kernels on Llama-2-7B's shapes, tiny AWQ engines), then quant_suite.py decode
# steps in one process: bf16, W4A16 + FP8 KV and FP8 + FP8 KV as shipped at batches 1 and 32 (the W4A16 + FP8 KV
# batch-1 step profiled), then at batch 1 the switch off, as shipped again, off again, and bf16 again.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_norm_epilogue_run.sh
# (Calls 1 and 2 ran earlier forms: see docs/benchmarks.md, "The RMSNorm in the W4A16 GEMVs' epilogues".)
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/quant"
timeout ${CHECK_TIMEOUT:-170} python3 benchmarks/gpu/w4a16_norm_epilogue_check.py --out "$OUT/epilogue_check.jsonl" \
  > "$OUT/epilogue_check.log" 2>&1
echo "check rc=$?"; grep -E "^\{|EPILOGUE|rror" "$OUT/epilogue_check.log" | cut -c1-600
off="INFERNEO_W4A16_NORM_EPILOGUE=0"
timeout ${SUITE_TIMEOUT:-360} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-350} --workloads "" \
  --decode-batches 1,32 --ab-batches 1 --profile w4a16+fp8kv --profile-batches 1 \
  --ab "w4kv-off@w4a16+fp8kv@$off" --ab "w4kv-again@w4a16+fp8kv" --ab "w4kv-off-again@w4a16+fp8kv@$off" \
  --ab "bf16-again@bf16" \
  --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror|critical|kind" "$OUT/quant/quant_suite.out" | grep -v "^ \{4,\}" | cut -c1-300
rm -rf "$OUT/quant/models"
