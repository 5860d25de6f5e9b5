#!/usr/bin/env bash
# One device call: issue 19's batch-1 layer chain (Qwen3-30B-A3B shapes, 48 layers in one CUDA graph) with the q/k
# norm + rotary + K/V store kernel's 36 heads over 1 (the shipped launch), 4, 5, 9 and 18 programs
# (INFERNEO_ROTARY_HEAD_GROUPS while each graph is captured; every variant's output checked equal to the base's),
# then the per-kernel profile of the base and the fastest.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/moe_heads_run.sh
source benchmarks/gpu/device_env.sh
timeout ${CHAIN_TIMEOUT:-300} python3 benchmarks/gpu/moe_b1_chain.py --set heads --out "$OUT/chain" \
  > "$OUT/chain.out" 2>&1
echo "moe_b1_chain rc=$?"; grep -vE "^ {4,}|Warning|warn" "$OUT/chain.out" | tail -40 | cut -c1-220
