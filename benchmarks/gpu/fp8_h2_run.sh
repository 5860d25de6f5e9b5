#!/usr/bin/env bash
# One device call for issue 20's FP8 batch-1 step with the packed-half one-row GEMV ("h2" tilings): the kernel
# checked and its tilings timed per layer (fp8_h2_check.py), then quant_suite.py: bf16 and FP8 decode steps at batch
# 1 and 32 (the shipped tiling file; profiled), FP8 at batch 1 with the h2 tilings that won (fp8-tiles, profiled), and
# gpt-fast's int8 batch-1 step, all in the same call.
# Usage: OUT=... bash benchmarks/gpu/fp8_h2_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-260}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 benchmarks/gpu/fp8_h2_check.py --deadline 100 --out "$OUT" > "$OUT/fp8_h2_check.log" 2>&1
echo "fp8_h2_check rc=$?"; tail -45 "$OUT/fp8_h2_check.log"
TILES=$(cat "$OUT/fp8_h2_tiles.json" 2>/dev/null || echo '{}')
[ -n "$TILES" ] || TILES='{}'
echo "fp8-tiles: $TILES"
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 60)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" \
  --skip fp8-w8a8,fp8-nonorm,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv --profile fp8,fp8-tiles --fp8-tiles "$TILES" \
  --out /tmp/quant_suite > "$OUT/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; tail -c 7000 "$OUT/quant_suite.out"
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/" 2>/dev/null
