#!/usr/bin/env bash
# One device call for issue 20's FP8 KV cache (2026-12-04): the decode/prefill attention kernels on an e4m3 cache
# checked against the reference on CUDA and timed against a bf16 cache at Llama-2-7B's attention shape
# (fp8kv_decode_bench.py; OLD=path of the previous triton_attention.py to time it beside), then quant_suite.py's
# bf16, FP8 (W8A8 weights, bf16 KV) and FP8 weights + FP8 KV cache, each with its decode steps, W1 and W2, in one
# process (W1/W2 with the engine's default asynchronous scheduling, --async-workloads). The suite is not run when a
# kernel check fails.
# Usage: OUT=... [OLD=...] bash benchmarks/gpu/fp8kv_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-300}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/env.txt"
timeout 170 python3 benchmarks/gpu/fp8kv_decode_bench.py --old "${OLD:-}" --out "$OUT" > "$OUT/kernel.log" 2>&1
rc=$?
echo "fp8kv_decode_bench rc=$rc"; tail -30 "$OUT/kernel.log"
if [ "$rc" != 0 ]; then echo "kernel checks failed or the bench broke: suite not run"; exit 1; fi
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --async-workloads --skip fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --out /tmp/quant_suite 2>&1 | tail -c 6000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/"
