#!/usr/bin/env bash
# The fused peer all-reduce + RMSNorm against NCCL at tensor parallelism, on one multi-GPU machine in one call.
#
#   bash benchmarks/gpu/tp_fused_ab.sh OUT_DIR
#
# Two processes, because PyTorch sets symmetric memory up once per process (see peer_all_reduce.py):
#   1. equality: TP=2 greedy tokens equal TP=1 (fp32, CUDA graphs) with the peer-memory paths on (the default);
#   2. W3 at TP=1 and TP=2 (peer memory), then TP=2 once more with NCCL only (the baseline, same run).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:?usage: tp_fused_ab.sh OUT_DIR}"
mkdir -p "$OUT"
S=benchmarks/gpu/tp_suite.py
python3 "$S" --sizes 1,2 --equality graphs --skip engine --out "$OUT/equality" > "$OUT/equality.log" 2>&1 \
    || echo "equality run failed (rc $?)"
python3 "$S" --sizes 1,2 --equality "" --skip repeat,w1 --nccl-w3 --out "$OUT/w3" > "$OUT/w3.log" 2>&1 \
    || echo "W3 run failed (rc $?)"
grep -h "W3 TP=\|EQUAL\|DIFFERENT\|peer\|NCCL\|FAIL\|Error\|ratio\|/ TP=1" "$OUT"/equality.log "$OUT"/w3.log | head -80
