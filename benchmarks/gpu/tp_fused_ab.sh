#!/usr/bin/env bash
# The fused peer all-reduce + RMSNorm against NCCL at tensor parallelism, on one multi-GPU machine in one call.
#
#   bash benchmarks/gpu/tp_fused_ab.sh OUT_DIR
#
# Three processes, because PyTorch sets symmetric memory up once per process (see peer_all_reduce.py):
#   1. equality: TP=2 greedy tokens equal TP=1 (fp32, CUDA graphs) with the fused path on;
#   2. W3 at TP=1 and TP=2 with the fused path on;
#   3. W3 at TP=2 with NCCL only (the baseline, same machine, same call).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:?usage: tp_fused_ab.sh OUT_DIR}"
mkdir -p "$OUT"
S=benchmarks/gpu/tp_suite.py
INFERNEO_PEER_ALL_REDUCE=1 python3 "$S" --sizes 1,2 --equality graphs --skip engine --out "$OUT/equality" \
    > "$OUT/equality.log" 2>&1 || echo "equality run failed (rc $?)"
INFERNEO_PEER_ALL_REDUCE=1 python3 "$S" --sizes 1,2 --equality "" --skip repeat,w1 --out "$OUT/fused" \
    > "$OUT/fused.log" 2>&1 || echo "fused run failed (rc $?)"
python3 "$S" --sizes 2 --equality "" --skip repeat,w1 --out "$OUT/nccl" > "$OUT/nccl.log" 2>&1 \
    || echo "nccl run failed (rc $?)"
grep -h "W3 TP=\|equal\|peer\|NCCL\|FAIL\|Error" "$OUT"/equality.log "$OUT"/fused.log "$OUT"/nccl.log | head -80
