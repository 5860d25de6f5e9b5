#!/usr/bin/env bash
# One device call after the q/k norm + rotary kernel took two heads a program under 16 tokens
# (_triton_elementwise.NORM_ROTARY_HEADS_PER_PROGRAM): issue 19's Qwen3-30B-A3B decode steps at batches 1 and 32
# as shipped, then INFERNEO_ROTARY_HEAD_GROUPS=1 (one program a token, the launch before) in the same process, the
# graphs captured again for each setting, two rounds in alternation (moe_suite.py --decode-only --ab).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/moe_heads_confirm.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/moe"
timeout ${MOE_TIMEOUT:-280} python3 benchmarks/gpu/moe_suite.py --decode-only --deadline ${MOE_DEADLINE:-260} \
  --ab "shipped:;one-program:INFERNEO_ROTARY_HEAD_GROUPS=1" --out "$OUT/moe" > "$OUT/moe/moe_suite.out" 2>&1
echo "moe_suite rc=$?"; grep -vE "^ {4,}" "$OUT/moe/moe_suite.out" | grep -vE "Warning|warn" | tail -30 | cut -c1-220
