#!/usr/bin/env bash
# One device call for issue 20's W4A16 targets (see README.md, "W4A16 kernels"): the Triton int4 kernels checked
# against F.linear and their tiles tuned on Llama-2-7B's shapes (int4_check.py, writing int4_configs.json), then
# quant_suite.py's bf16 and W4A16 (AWQ g128) decode steps at batch 1 and 32 in one process (and W1 when asked:
# int4_run.sh DEADLINE w1).
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-150}
WORKLOADS=${2:-}
export PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/gpu/int4_check.py --write-configs --out "$OUT" > "$OUT/int4_check.log" 2>&1
echo "int4_check rc=$?"; grep -E "^(best|all|FAILED|--)" "$OUT/int4_check.log" | tail -30
timeout $((DEADLINE + 40)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --skip fp8,fp8-kv,gptfast \
  --workloads "$WORKLOADS" --out "$OUT" 2>&1 | tail -c 5000
