#!/usr/bin/env bash
# The confirmation call after moe_b1_pre_run.sh (docs/benchmarks.md, "Reads before the wait"), on the tree with the
# kept changes as defaults: the CUDA checks (prewait_check.py), the float32 HF parity of Qwen3 and the MoE
# architectures on CUDA with the defaults, and moe_suite.py --decode-only: the default rows, then the shipped
# defaults against everything off (--ab, one round). Logs into $OUT, the rest into $OUT/call.tgz.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 40 python3 benchmarks/gpu/prewait_check.py --out "$WORK/check" > "$OUT/check.log" 2>&1
echo "check rc=$?"
grep -vE "UserWarning|_warn_once" "$OUT/check.log" | cut -c1-160 | tail -n 20
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k \
  "test_single_prompt_matches_hf and (qwen3 or gpt_oss or mixtral)" > "$OUT/parity.log" 2>&1
echo "parity (defaults) rc=$?"; tail -n 2 "$OUT/parity.log"
AB="shipped:INFERNEO_PREWAIT_LOADS=,INFERNEO_ROTARY_WARPS=,INFERNEO_MOE_PAIR_TILES="
AB="$AB;off:INFERNEO_PREWAIT_LOADS=none,INFERNEO_ROTARY_WARPS=4,INFERNEO_MOE_PAIR_TILES=up_block_n=8+up_block_k=1024"
timeout 100 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 95 --ab "$AB" --ab-rounds 1 \
  --out "$WORK/suite" > "$OUT/suite.log" 2>&1
echo "suite rc=$?"
grep -E "ms/step|A/B |Error|failed" "$OUT/suite.log" | cut -c1-150
tar czf "$OUT/call.tgz" -C "$WORK" .
rm -rf "$WORK"
