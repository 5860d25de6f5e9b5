#!/usr/bin/env bash
# One device call for issue 19's batch-1 decode step, L2 prefetches and the expert tiles (docs/benchmarks.md,
# "L2 prefetches between the batch-1 kernels"): the few-token expert tiles and the GEMV swept and written
# (moe_decode_sweep.py --write-configs), the 48-layer chain with each prefetch variant (moe_l2_prefetch.py),
# then moe_suite.py --decode-only once per INFERNEO_CUDA_L2_PREFETCH setting named in $PREFETCH_SETTINGS
# (default "0 o o,down"), with the CUDA parity of the MoE architectures first when PARITY=1. Everything the call
# writes goes into $OUT/call.tgz; the logs also stay beside it. About 3 minutes on one H200.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
if [ "${SWEEP:-1}" = 1 ]; then
  timeout 70 python3 benchmarks/gpu/moe_decode_sweep.py --out "$WORK/sweep" --write-configs > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$?"; grep -E "gate/up|down |best|call T=|Error|error" "$OUT/sweep.log" | cut -c1-150 | tail -n 32
fi
if [ "${CHAIN:-1}" = 1 ]; then
  timeout 120 python3 benchmarks/gpu/moe_l2_prefetch.py --out "$WORK/chain" --best-tiles "$WORK/sweep/moe_decode_sweep.json" \
    > "$OUT/chain.log" 2>&1
  echo "chain rc=$?"; grep -vE "^\s*$" "$OUT/chain.log" | cut -c1-170 | tail -n 16
fi
if [ "${PARITY:-0}" = 1 ]; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k "test_single_prompt_matches_hf and \
(qwen3 or qwen2_moe or mixtral or gpt_oss or gemma3)" > "$OUT/parity.log" 2>&1
  echo "parity rc=$?"; tail -n 3 "$OUT/parity.log"
fi
for pf in ${PREFETCH_SETTINGS:-0 o o,down}; do
  name=suite_$(echo "$pf" | tr ',' '_')
  echo "== INFERNEO_CUDA_L2_PREFETCH=$pf"
  INFERNEO_CUDA_L2_PREFETCH=$pf timeout 100 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 85 \
    --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  grep -E "ms/step|us/step|_kernel|FAIL|PASS|Error" "$WORK/$name.log" | cut -c1-110 | head -n 20
done
cat "$WORK"/suite_*.log > "$OUT/suites.log" 2>/dev/null
tar czf "$OUT/call.tgz" -C "$WORK" .
rm -rf "$WORK"
