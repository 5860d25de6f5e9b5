#!/usr/bin/env bash
# Second device call (2026-12-04, branch h-fp8d): the shipped one-row h2 kernel in whole-row tilings (each program's
# weight loads all issued before its PDL wait, as bf16's GEMV issues its tiles'; fp8_h2_check.py --whole: checked
# against float32, timed per layer beside the shipped tiling and bf16's GEMV, winners written to a tiling file),
# then the decode step at batch 1 in one process: bf16, FP8 weights + FP8 KV with the shipped tiling file and with
# the winners' (INFERNEO_FP8_GEMV_CONFIGS), alternated.
# Usage: OUT=... bash benchmarks/gpu/fp8d_run2.sh [sweep deadline s] [suite deadline s]
set -u
OUT=${OUT:?set OUT}
SWEEP=${1:-80}
DEADLINE=${2:-100}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout $((SWEEP + 90)) python3 benchmarks/gpu/fp8_h2_check.py --whole --deadline "$SWEEP" --out "$OUT" > "$OUT/whole_check.log" 2>&1
echo "fp8_h2_check rc=$?"; grep -E "FAIL|replay|checks:|rows  1|won|totals|Error" "$OUT/whole_check.log" | cut -c1-200 | tail -40
grep -c "ok rel_err" "$OUT/whole_check.log"
CFG="$OUT/fp8_gemv_configs-h2.json"
[ -s "$CFG" ] || { echo "no tiling file"; exit 1; }
mkdir -p /tmp/qs
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" \
  --decode-batches 1 --ab-batches 1 \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --ab "fp8kv-whole@fp8+fp8kv@INFERNEO_FP8_GEMV_CONFIGS=$CFG" --ab "fp8kv-again@fp8+fp8kv" \
  --ab "fp8kv-whole-again@fp8+fp8kv@INFERNEO_FP8_GEMV_CONFIGS=$CFG" --ab "bf16-again@bf16" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "ceil|copy|decode batch|error|Error" /tmp/qs/quant_suite.log | cut -c1-200 | tail -20
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
