#!/usr/bin/env bash
# One device call for issue 19's batch-1 decode step with early PDL launches (docs/benchmarks.md, "Early
# launches"): the 48-layer chain (moe_b1_chain.py) with late launches, then with early ones (writing the output
# projection's and q/k/v GEMV's tiles where they win, and checking the output equal to the late run's), the float32
# HF parity of the MoE architectures, Qwen3 and Gemma 3 on CUDA, then moe_suite.py --decode-only with
# INFERNEO_CUDA_PDL_EARLY=1, 0, 1. If the early chain fails, the rest runs with early launches off. Everything
# goes into $OUT/call.tgz, the logs also beside it. About 4 minutes on one H200.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
INFERNEO_CUDA_PDL_EARLY=0 timeout 60 python3 benchmarks/gpu/moe_b1_chain.py --out "$WORK/chain_late" > "$OUT/chain.log" 2>&1
echo "chain late rc=$?"
INFERNEO_CUDA_PDL_EARLY=1 timeout 60 python3 benchmarks/gpu/moe_b1_chain.py --out "$WORK/chain_early" --write-configs \
  --compare "$WORK/chain_late/base_output.pt" >> "$OUT/chain.log" 2>&1
rc=$?; echo "chain early rc=$rc"
[ $rc = 0 ] || export INFERNEO_CUDA_PDL_EARLY=0
grep -vE "^\s*$" "$OUT/chain.log" | grep -E "us a layer|early|equal|wrote|kept|Error" | cut -c1-150
cp inferneo/kernels/gemv_configs.json "$WORK/"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k "test_single_prompt_matches_hf and \
(qwen3 or qwen2_moe or mixtral or gpt_oss or gemma3)" > "$OUT/parity.log" 2>&1
echo "parity rc=$?"; tail -n 3 "$OUT/parity.log"
i=0
for early in 1 0 1; do
  i=$((i + 1))
  [ $rc = 0 ] || early=0
  echo "== suite $i, INFERNEO_CUDA_PDL_EARLY=$early"
  INFERNEO_CUDA_PDL_EARLY=$early timeout 75 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 160 \
    --out "$WORK/suite${i}_early$early" > "$WORK/suite${i}_early$early.log" 2>&1
  grep -E "ms/step|us/step|_kernel|Error" "$WORK/suite${i}_early$early.log" | cut -c1-100 | head -n 16
  { echo "== suite $i, INFERNEO_CUDA_PDL_EARLY=$early"; cat "$WORK/suite${i}_early$early.log"; } >> "$OUT/suites.log"
done
tar czf "$OUT/call.tgz" -C "$WORK" .
rm -rf "$WORK"
