#!/usr/bin/env bash
# One device call for the W4A16 kernels' launches and decode steps (docs/benchmarks.md, "W4A16 at one row in
# packed half precision" and "W4A16 at 16 and 32 rows: wider tensor-core tiles"):
#   1. int4_check.py --rows $ROWS (default 1) --write-configs (CHECK=0 leaves it out: the committed table): every launch at those rows (one row: the h2 tilings
#      beside the GEMV, the tensor-core kernel and tinygemm; more: the tensor-core tilings) checked against
#      F.linear and timed on Llama-2-7B's shapes; the table's entries for those rows rewritten, the others kept;
#   2. w4a16_h2_e2e.py (E2E=0 leaves it out): the engine on tiny AWQ / GPTQ checkpoints, bf16 and fp16, h2
#      against the older kernels and the reference path;
#   3. quant_suite.py: bf16, W4A16 and W4A16 + FP8 KV decode steps at batches $DECODE (default 1,32) in one process, reading the
#      table just written (SUITE_SKIP replaces the sections left out; SUITE_DEADLINE, SUITE_TIMEOUT).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_h2_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/check" "$OUT/quant"
if [ "${CHECK:-1}" != 0 ]; then
  timeout ${CHECK_TIMEOUT:-220} python3 benchmarks/gpu/int4_check.py --write-configs --rows ${ROWS:-1} --out "$OUT/check" \
    > "$OUT/check/int4_check.log" 2>&1
  echo "int4_check rc=$?"
  grep -E "^(best|all|FAILED|--|layer set|SUMMARY)" "$OUT/check/int4_check.log" | cut -c1-400 | tail -24
  cp inferneo/kernels/int4_configs.json "$OUT/check/int4_configs.after.json"
fi
if [ "${E2E:-1}" != 0 ]; then
  timeout 260 python3 benchmarks/gpu/w4a16_h2_e2e.py --out "$OUT/e2e.jsonl" > "$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"; grep -v shards "$OUT/e2e.log" | tail -5
fi
timeout ${SUITE_TIMEOUT:-210} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-200} --workloads "" \
  --decode-batches ${DECODE:-1,32} --skip ${SUITE_SKIP:-fp8,fp8-w8a8,fp8-nonorm,fp8-kv,fp8+fp8kv,w4a16-rows,w4a16-tinygemm,gptfast} \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | tail -c 3000
