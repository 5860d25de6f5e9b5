#!/usr/bin/env bash
# The second device call for issue 20's batch-1 step: split decode attention merged in the attention kernel
# (decode_reduce_check.py: checked against the two-kernel path, timed per layer), the h2 one-row FP8 GEMV in wide
# tilings (fp8_h2_check.py --wide: checked, timed per layer beside the shipped tilings), then quant_suite.py: bf16 and
# FP8 decode steps at batch 1 and 32, the same at batch 1 and 4 with the fused reduction (bf16-fusedreduce,
# fp8-fusedreduce), and FP8 at batch 1 with any wide h2 tiling that won (fp8-tiles), in the same call.
# Usage: OUT=... bash benchmarks/gpu/fp8_h2_run2.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-120}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 benchmarks/gpu/decode_reduce_check.py --out "$OUT" > "$OUT/decode_reduce_check.log" 2>&1
echo "decode_reduce_check rc=$?"; tail -12 "$OUT/decode_reduce_check.log"
timeout 100 python3 benchmarks/gpu/fp8_h2_check.py --wide --deadline 60 --out "$OUT" > "$OUT/fp8_h2_check.log" 2>&1
echo "fp8_h2_check rc=$?"; grep -v "^check h2_wide.*ok" "$OUT/fp8_h2_check.log" | tail -25
TILES=$(cat "$OUT/fp8_h2_tiles.json" 2>/dev/null || echo '{}')
[ -n "$TILES" ] || TILES='{}'
echo "fp8-tiles: $TILES"
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 40)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" --fused-reduce \
  --skip fp8-w8a8,fp8-nonorm,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast --profile fp8-fusedreduce --fp8-tiles "$TILES" \
  --out /tmp/quant_suite > "$OUT/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant_suite.out" | tail -c 5000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/" 2>/dev/null
