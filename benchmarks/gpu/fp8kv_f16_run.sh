#!/usr/bin/env bash
# One device call for issue 20's FP8 KV cache read through float16 dots (2026-12-04 afternoon): the decode/prefill
# attention kernels on an e4m3 cache checked against the reference on CUDA with every widening (0: bfloat16 by
# integer operations, the default; 1: its shorter permute; 2: float16 queries and hardware-converted float16 tiles)
# and timed against a bf16 cache (fp8kv_decode_bench.py), then quant_suite.py's bf16 and FP8 weights + FP8 KV cache
# with INFERNEO_FP8_KV_WIDEN=0 and =2, each with its decode steps, W1 and W2, in one process. The suite is not run
# when the bench breaks (a failed check, exit 2, is reported and the timings still run: no default follows from a
# failed check).
# Usage: OUT=... bash benchmarks/gpu/fp8kv_f16_run.sh [suite deadline s] [widens, default 0,2]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-300}
WIDENS=${2:-0,2}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/env.txt"
timeout 170 python3 benchmarks/gpu/fp8kv_decode_bench.py --out "$OUT" > "$OUT/kernel.log" 2>&1
rc=$?
echo "fp8kv_decode_bench rc=$rc"; tail -32 "$OUT/kernel.log"
if [ "$rc" = 2 ]; then echo "*** kernel checks FAILED (see kernel.log); timings continue, no default follows"; fi
if [ "$rc" != 0 ] && [ "$rc" != 2 ]; then echo "the bench broke: suite not run"; exit 1; fi
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast \
  --fp8kv-widen "$WIDENS" --out /tmp/quant_suite 2>&1 | tail -c 6000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/"
