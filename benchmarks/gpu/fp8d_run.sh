#!/usr/bin/env bash
# One device call (2026-12-04, branch h-fp8d) for issue 20's batch-1 FP8 step: the one-row FP8 GEMV with its weights
# streamed through a shared-memory pipeline (tiling option h2p): fp8_h2p_check.py checks every swept tiling against
# float32 and times them per Llama-2-7B layer beside the shipped h2 tiling and bf16's GEMV, writing a tiling file
# with the winners; then quant_suite.py times the decode step at batch 1 in one process: bf16, FP8 weights (bf16 and
# FP8 KV) with the shipped tiling file and with the winners' (INFERNEO_FP8_GEMV_CONFIGS), each FP8 pair once more in
# the other order, and profiles of the FP8 + FP8 KV step both ways.
# Usage: OUT=... bash benchmarks/gpu/fp8d_run.sh [sweep deadline s] [suite deadline s]
set -u
OUT=${OUT:?set OUT}
SWEEP=${1:-120}
DEADLINE=${2:-150}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout $((SWEEP + 150)) python3 benchmarks/gpu/fp8_h2p_check.py --deadline "$SWEEP" --out "$OUT" > "$OUT/h2p_check.log" 2>&1
echo "fp8_h2p_check rc=$?"; grep -E "FAIL|check |checks:|h2p_vs|rows  1|won|totals|Error" "$OUT/h2p_check.log" | cut -c1-260 | tail -80
CFG="$OUT/fp8_gemv_configs-h2p.json"
[ -s "$CFG" ] || { echo "no tiling file"; exit 1; }
mkdir -p /tmp/qs
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" \
  --decode-batches 1 --ab-batches 1 --profile fp8+fp8kv,fp8kv-h2p --profile-batches 1 \
  --skip fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --ab "fp8kv-h2p@fp8+fp8kv@INFERNEO_FP8_GEMV_CONFIGS=$CFG" --ab "fp8-h2p@fp8@INFERNEO_FP8_GEMV_CONFIGS=$CFG" \
  --ab "fp8-h2p-again@fp8@INFERNEO_FP8_GEMV_CONFIGS=$CFG" --ab "fp8-again@fp8" \
  --ab "fp8kv-h2p-again@fp8+fp8kv@INFERNEO_FP8_GEMV_CONFIGS=$CFG" --ab "fp8kv-again@fp8+fp8kv" --ab "bf16-again@bf16" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "ceil|copy|decode batch|profile|GEMV|gemv|error|Error" /tmp/qs/quant_suite.log | cut -c1-260 | tail -60
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
