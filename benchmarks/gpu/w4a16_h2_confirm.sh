#!/usr/bin/env bash
# The second device call for the one-row packed-half W4A16 kernel: the engine check (w4a16_h2_e2e.py), then bf16,
# W4A16, W4A16 + FP8 KV and FP8 + FP8 KV decode steps at batch 1 and 32 in one process with the committed table.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_h2_confirm.sh
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  scratch/quant/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT/quant"
timeout 260 python3 benchmarks/gpu/w4a16_h2_e2e.py --out "$OUT/e2e.jsonl" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$?"; grep -v shards "$OUT/e2e.log" | tail -6
timeout ${SUITE_TIMEOUT:-230} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-220} --workloads "" \
  --decode-batches 1,32 --skip ${SUITE_SKIP:-fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16-rows,w4a16-tinygemm,gptfast} \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | tail -c 3500
