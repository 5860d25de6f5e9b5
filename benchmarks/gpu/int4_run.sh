#!/usr/bin/env bash
# One device call for issue 20's W4A16 targets (see README.md, "W4A16 kernels"): the Triton int4 kernels checked
# against F.linear and their launches tuned on Llama-2-7B's shapes (int4_check.py, writing int4_configs.json), then
# quant_suite.py's bf16, W4A16 (AWQ g128) and W4A16 + FP8 KV decode steps at batch 1 and 32 in one process,
# reading the launches just written (and W1 when asked: int4_run.sh DEADLINE w1). CHECK_ARGS adds options to
# int4_check.py (e.g. --quick), SUITE_ARGS to quant_suite.py (e.g. --profile w4a16); SUITE_SKIP replaces the
# suite's sections left out (default: everything but bf16, w4a16, w4a16-rows and w4a16+fp8kv).
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-150}
WORKLOADS=${2:-}
export PYTHONUNBUFFERED=1
timeout ${CHECK_TIMEOUT:-240} python3 benchmarks/gpu/int4_check.py --write-configs --out "$OUT" ${CHECK_ARGS:-} \
  > "$OUT/int4_check.log" 2>&1
echo "int4_check rc=$?"; grep -E "^(best|all|FAILED|--|layer set|SUMMARY|TINYGEMM|LAYOUT)" "$OUT/int4_check.log" | tail -40
timeout $((DEADLINE + 40)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --skip "${SUITE_SKIP:-fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,gptfast}" --workloads "$WORKLOADS" --out "$OUT" ${SUITE_ARGS:-} 2>&1 \
  | tail -c 7000
