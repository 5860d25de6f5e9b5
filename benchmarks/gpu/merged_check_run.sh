#!/usr/bin/env bash
# One device call on main's merged tree (2026-12-04): the batch-1 and batch-32 decode steps with every default as
# shipped, so the helpers' separate calls are confirmed on the tree users get: Llama-2-7B bf16, FP8, W4A16 and
# gpt-fast's int8 in one process (quant_suite.py), then Qwen3-30B-A3B's decode steps (moe_suite.py --decode-only).
# Usage (carry scratch/quant/whl and scratch/gpt-fast): OUT=... bash benchmarks/gpu/merged_check_run.sh
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  scratch/quant/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
mkdir -p "$OUT/quant" "$OUT/moe"
timeout 250 python3 benchmarks/gpu/quant_suite.py --deadline 240 --workloads "" --decode-batches 1,32 \
  --skip fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16+fp8kv,w4a16-rows,w4a16-tinygemm --out "$OUT/quant" \
  > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | tail -c 3000
timeout 130 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 120 --out "$OUT/moe" \
  > "$OUT/moe/moe_suite.out" 2>&1
echo "moe_suite rc=$?"; tail -c 2500 "$OUT/moe/moe_suite.out"
