#!/usr/bin/env bash
# One device call for issue 20's remaining GPU figures: the FP8 GEMV checked on CUDA (the tensor-core kernel's
# "bits" option included) and tiled at 1 row (CUDA-core tilings with several weight rows per thread) and 16-64 rows
# (tensor-core) beside W8A8 (fp8_gemv_sweep.py --options, which merges the winners into
# inferneo/kernels/fp8_gemv_configs.json), then quant_suite.py: bf16, FP8, FP8 weights + FP8 KV cache (decode
# steps; W1/W2 left out: device time), W4A16 + FP8 KV cache (decode steps), the FP8 decode steps profiled.
# Usage: OUT=... bash benchmarks/gpu/quant_opt_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-100}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 benchmarks/gpu/fp8_gemv_sweep.py --options --write-configs --deadline 30 --out "$OUT" \
  > "$OUT/fp8_gemv_sweep.log" 2>&1
echo "fp8_gemv_sweep rc=$?"; grep -v "^check .*: ok" "$OUT/fp8_gemv_sweep.log" | grep -v "FP8 GEMV (" | tail -40
cp inferneo/kernels/fp8_gemv_configs.json "$OUT/fp8_gemv_configs.json"
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 15)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --skip fp8-w8a8,w4a16,fp8-kv,gptfast --workloads "" --profile fp8 --out /tmp/quant_suite 2>&1 | tail -c 9000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/"
