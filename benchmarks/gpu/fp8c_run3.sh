#!/usr/bin/env bash
# Third device call (2026-12-04 evening, branch h-fp8c; the early launches of RMSNorm and the KV store now on by
# default): quant_suite.py with W2 under the engine's default asynchronous scheduling (--async-workloads), bf16 and
# FP8 weights + FP8 KV cache in one process, then fp8c_equal.py (greedy ids with the early launches off and on).
# Usage: OUT=... bash benchmarks/gpu/fp8c_run3.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-108}
export PYTHONUNBUFFERED=1
mkdir -p /tmp/qs
timeout $((DEADLINE + 20)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads w2 \
  --async-workloads --decode-batches 1 \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "ceil|copy|decode batch|W1 Inf|W2 Inf|PASS|FAIL|error" /tmp/qs/quant_suite.log | cut -c1-300
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
timeout 30 python3 benchmarks/gpu/fp8c_equal.py --out "$OUT" > "$OUT/equal.log" 2>&1; echo "equal rc=$?"; tail -2 "$OUT/equal.log"
