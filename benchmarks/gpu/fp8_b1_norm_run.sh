#!/usr/bin/env bash
# Second device call for issue 20's FP8 batch-1 step (short: decode steps at batch 1 only): the one-pass norm-fused
# FP8 GEMV checked and timed in several tilings (fp8_norm_check.py), then quant_suite.py at batch 1: bf16, FP8 (norm
# fused, the GEMV's tilings), FP8 with the fusion off (INFERNEO_FP8_NORM_GEMV=0) and FP8 with the fused kernel in
# the check's fastest tiling per shape (fp8-tiles, the tiling file's "norm_shapes").
# Usage: OUT=... bash benchmarks/gpu/fp8_b1_norm_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-60}
export PYTHONUNBUFFERED=1
export INFERNEO_FP8_NORM_GEMV=${INFERNEO_FP8_NORM_GEMV:-1}  # "fp8" is the norm-fused variant (default off since)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 benchmarks/gpu/fp8_norm_check.py --out "$OUT" > "$OUT/fp8_norm_check.log" 2>&1
echo "fp8_norm_check rc=$?"; tail -24 "$OUT/fp8_norm_check.log"
TILES=$(python3 - "$OUT/fp8_norm_check.json" <<'PY'
import ast, json, sys
shapes = {"qkv_proj": "norm 12288,4096", "gate_up_proj": "norm 22016,4096"}
out = {}
try:
    timing = json.load(open(sys.argv[1]))["timing_us"]
    for name, key in shapes.items():
        fused = {t: us for t, us in timing[name].items() if t.startswith("fused ")}
        n, k, w = ast.literal_eval(min(fused, key=fused.get).removeprefix("fused "))
        out[key] = {"block_n": n, "block_k": k, "num_warps": w}
except Exception as e:
    print(f"no tiles: {e}", file=sys.stderr)
print(json.dumps(out))
PY
)
echo "fp8-tiles: $TILES"
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 15)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads "" \
  --decode-batches 1 --skip fp8-w8a8,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast --fp8-tiles "$TILES" \
  --out /tmp/quant_suite 2>&1 | grep -v "^  _warn_once\|UserWarning" | tail -c 5000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/"
