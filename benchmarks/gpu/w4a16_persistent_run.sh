#!/usr/bin/env bash
# One device call for the persistent one-row W4A16 kernel (triton_int4._gemv_h2_persistent_kernel, kind
# "h2_persistent"): w4a16_h2_run.sh at one row:
#   1. int4_check.py --rows 1 --write-configs: every one-row launch on Llama-2-7B's shapes (the persistent tilings
#      beside the h2 ones, the GEMV, tensor cores and tinygemm) checked against float32 F.linear and timed; the
#      table's one-row entries rewritten;
#   2. w4a16_h2_e2e.py: tiny AWQ / GPTQ checkpoints through the engine, the h2 kernel and its persistent form
#      against the older kernels and the reference path;
#   3. quant_suite.py: bf16, W4A16 and W4A16 + FP8 KV decode steps at batch $DECODE (default 1), reading the table.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_persistent_run.sh
ROWS=1 DECODE=${DECODE:-1} CHECK_TIMEOUT=${CHECK_TIMEOUT:-300} bash benchmarks/gpu/w4a16_h2_run.sh
