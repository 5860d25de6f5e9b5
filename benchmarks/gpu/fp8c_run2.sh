#!/usr/bin/env bash
# Second device call for issue 20's FP8 targets (2026-12-04 evening, branch h-fp8c): fp8c_check.py (the one-row
# FP8 GEMV with INFERNEO_FP8_GEMV_PREFETCH and the decode kernel's weight prefetch, each equal bit for bit), then
# quant_suite.py in one process: bf16 and FP8 weights + FP8 KV cache (batch-1 step; profiles at 1 and 256 requests
# at 640 tokens with the critical path per kernel and the host's time a step; W1, W2), the batch-1 A/Bs
# (INFERNEO_FP8_GEMV_PREFETCH, INFERNEO_PDL_EARLY_EXTRA, INFERNEO_DECODE_SPLIT_TILES; the bases again), and the
# candidate settings with W1 and W2.
# Usage: OUT=... bash benchmarks/gpu/fp8c_run2.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-250}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/env.txt"
timeout 100 python3 benchmarks/gpu/fp8c_check.py --out "$OUT" > "$OUT/check.log" 2>&1
rc=$?
echo "fp8c_check rc=$rc"; tail -6 "$OUT/check.log" | cut -c1-800
if [ "$rc" != 0 ]; then echo "CHECKS FAILED (rc=$rc): the suite still runs; read check.log"; fi
GP=INFERNEO_FP8_GEMV_PREFETCH; EX=INFERNEO_PDL_EARLY_EXTRA; ST=INFERNEO_DECODE_SPLIT_TILES
mkdir -p /tmp/qs
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads w1,w2 \
  --decode-batches 1 --profile bf16,fp8+fp8kv --profile-batches 1,256 --profile-ctx 640 \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --ab "kv-gpf@fp8+fp8kv@$GP=1" --ab "kv-early@fp8+fp8kv@$EX=norm,store" \
  --ab "kv-early-gpf@fp8+fp8kv@$EX=norm,store@$GP=1" --ab "kv-again@fp8+fp8kv" \
  --ab "kv-gpf-2@fp8+fp8kv@$GP=1" --ab "kv-early-gpf-2@fp8+fp8kv@$EX=norm,store@$GP=1" \
  --ab "kv-st3@fp8+fp8kv@$ST=3" --ab "kv-st4@fp8+fp8kv@$ST=4" \
  --ab "bf16-early@bf16@$EX=norm,store" --ab "bf16-again@bf16" \
  --ab "kv-cand@fp8+fp8kv@$EX=norm,store@$GP=1@workloads=w1,w2" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|W1 Inf|W2 Inf|host:|critical path|PASS|FAIL|x bf16|error" /tmp/qs/quant_suite.log | cut -c1-420
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
