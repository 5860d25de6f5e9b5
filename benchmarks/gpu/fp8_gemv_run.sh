#!/usr/bin/env bash
# One device call for issue 20's FP8 speed targets: the FP8 weight-only GEMV checked on CUDA and tiled on the
# Llama-2-7B shapes (fp8_gemv_sweep.py, which writes inferneo/kernels/fp8_gemv_configs.json for the engine), then
# quant_suite.py's bf16 and FP8 sections (decode steps at batch 1 and 32, W1, W2) and the FP8 decode steps with the
# GEMV off, in one process each. Usage: OUT=... bash benchmarks/gpu/fp8_gemv_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-175}
export PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/gpu/fp8_gemv_sweep.py --write-configs --deadline 40 --out "$OUT" > "$OUT/fp8_gemv_sweep.log" 2>&1
echo "fp8_gemv_sweep rc=$?"; grep -v "^check .*: ok" "$OUT/fp8_gemv_sweep.log" | tail -60
timeout $((DEADLINE + 25)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --skip w4a16,fp8-kv,gptfast \
  --out "$OUT" 2>&1 | tail -c 6000
