#!/usr/bin/env bash
# One device call for issue 19's batch-1 decode step (docs/benchmarks.md, "The expert hint, 16 splits and the split
# merge inside the decode kernel"): the 48-layer chain (moe_b1_chain.py --set ab: the GPU check of the fused split
# merge, then the evict_first hint on the expert weights, two-tile attention splits and the fused merge, alone and
# together, and per-kernel profiles of CUDA-graph replays), the float32 HF parity on CUDA with all three switches
# on, then moe_suite.py --decode-only with --ab (the engine's step under each setting, graphs re-captured, two
# rounds in alternation, and the graph-mode kernel profile). Everything into $OUT/call.tgz, logs beside it.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
WORK="$OUT/work"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
timeout 60 python3 benchmarks/gpu/moe_b1_chain.py --set ab --out "$WORK/chain" > "$OUT/chain.log" 2>&1
echo "chain rc=$?"
grep -vE "^\s*$" "$OUT/chain.log" | grep -vE "UserWarning|_warn_once" | cut -c1-160
ALL="INFERNEO_MOE_EVICT=1 INFERNEO_DECODE_SPLIT_TILES=2 INFERNEO_DECODE_FUSED_REDUCE=1"
env $ALL timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k \
  "test_single_prompt_matches_hf and (qwen3 or gpt_oss or gemma3 or mixtral)" > "$OUT/parity.log" 2>&1
echo "parity (all switches on) rc=$?"; tail -n 2 "$OUT/parity.log"
off="INFERNEO_MOE_EVICT=0,INFERNEO_DECODE_SPLIT_TILES=0,INFERNEO_DECODE_FUSED_REDUCE=0"
AB="base:$off"
AB="$AB;evict_first:INFERNEO_MOE_EVICT=1,INFERNEO_DECODE_SPLIT_TILES=0,INFERNEO_DECODE_FUSED_REDUCE=0"
AB="$AB;16 splits:INFERNEO_MOE_EVICT=0,INFERNEO_DECODE_SPLIT_TILES=2,INFERNEO_DECODE_FUSED_REDUCE=0"
AB="$AB;fused merge:INFERNEO_MOE_EVICT=0,INFERNEO_DECODE_SPLIT_TILES=0,INFERNEO_DECODE_FUSED_REDUCE=1"
AB="$AB;evict_first + 16 splits:INFERNEO_MOE_EVICT=1,INFERNEO_DECODE_SPLIT_TILES=2,INFERNEO_DECODE_FUSED_REDUCE=0"
AB="$AB;all three:INFERNEO_MOE_EVICT=1,INFERNEO_DECODE_SPLIT_TILES=2,INFERNEO_DECODE_FUSED_REDUCE=1"
timeout 170 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 160 --ab "$AB" --ab-rounds 2 \
  --out "$WORK/suite" > "$OUT/suite.log" 2>&1
echo "suite rc=$?"
grep -E "ms/step|A/B |added|dur |Error|failed" "$OUT/suite.log" | cut -c1-150
tar czf "$OUT/call.tgz" -C "$WORK" .
rm -rf "$WORK"
