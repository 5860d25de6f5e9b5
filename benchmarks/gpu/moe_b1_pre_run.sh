#!/usr/bin/env bash
# One device call for issue 19's batch-1 decode step (docs/benchmarks.md, "Reads before the wait"): the CUDA
# bit-equality checks of the reads moved before the programmatic-dependent-launch wait (prewait_check.py), the
# 48-layer chain with each of them (moe_b1_chain.py --set pre, with its race check and per-kernel profiles), the
# float32 HF parity on CUDA with all of them on, then moe_suite.py --decode-only --ab (the engine's step under each
# setting, graphs re-captured, two rounds in alternation). Logs into $OUT, the rest into $OUT/call.tgz.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
timeout 60 python3 benchmarks/gpu/prewait_check.py --out "$WORK/check" > "$OUT/check.log" 2>&1
echo "check rc=$?"
grep -vE "UserWarning|_warn_once" "$OUT/check.log" | cut -c1-160 | tail -n 20
timeout 130 python3 benchmarks/gpu/moe_b1_chain.py --set pre --out "$WORK/chain" > "$OUT/chain.log" 2>&1
echo "chain rc=$?"
grep -vE "^\s*$" "$OUT/chain.log" | grep -vE "UserWarning|_warn_once" | cut -c1-160
ALL="INFERNEO_PREWAIT_LOADS=all INFERNEO_ROTARY_WARPS=8"
env $ALL timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k \
  "test_single_prompt_matches_hf and (qwen3 or gpt_oss or gemma3 or mixtral)" > "$OUT/parity.log" 2>&1
echo "parity (all switches on) rc=$?"; tail -n 2 "$OUT/parity.log"
# the suite's settings: the base, and the chain's fastest switches and expert tiles (each where it beat the base)
AB=$(python3 benchmarks/gpu/moe_b1_chain.py --ab-from "$WORK/chain/moe_b1_chain.json" 2>/dev/null | tail -n 1)
if [ -z "$AB" ]; then
  AB="base:INFERNEO_PREWAIT_LOADS=none,INFERNEO_ROTARY_WARPS=4,INFERNEO_MOE_PAIR_TILES="
  AB="$AB;prewait all:INFERNEO_PREWAIT_LOADS=all,INFERNEO_ROTARY_WARPS=8,INFERNEO_MOE_PAIR_TILES="
fi
echo "suite A/B: $AB"
timeout 190 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 180 --ab "$AB" --ab-rounds 2 \
  --out "$WORK/suite" > "$OUT/suite.log" 2>&1
echo "suite rc=$?"
grep -E "ms/step|A/B |added|dur |Error|failed" "$OUT/suite.log" | cut -c1-150
tar czf "$OUT/call.tgz" -C "$WORK" .
rm -rf "$WORK"
