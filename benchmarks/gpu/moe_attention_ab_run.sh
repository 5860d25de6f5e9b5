#!/usr/bin/env bash
# One device call (2026-12-06): issue 19's batch-1 step (Qwen3-30B-A3B, 1,040 tokens of context) with the decode
# attention's tiles narrowed for grouped queries at one request, through INFERNEO_DECODE_LAUNCH (the split rule then
# gives more, shorter splits): moe_suite.py --decode-only --ab, the graphs captured again for each setting, two
# rounds in alternation, with the graph-mode kernel profiles.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/moe_attention_ab_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/moe"
AB="base:;bn32:INFERNEO_DECODE_LAUNCH=block_n=32"
AB="$AB;bn32w4:INFERNEO_DECODE_LAUNCH=block_n=32+num_warps=4"
timeout ${MOE_TIMEOUT:-520} python3 benchmarks/gpu/moe_suite.py --decode-only --deadline ${MOE_DEADLINE:-500} \
  --ab "$AB" --out "$OUT/moe" > "$OUT/moe/moe_suite.out" 2>&1
echo "moe_suite rc=$?"; grep -vE "^ {4,}" "$OUT/moe/moe_suite.out" | grep -vE "Warning|warn" | tail -45 | cut -c1-220
