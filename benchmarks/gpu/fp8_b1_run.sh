#!/usr/bin/env bash
# One device call for issue 20's FP8 batch-1 step: the FP8 GEMV with its RMSNorm inside checked and timed on CUDA
# (fp8_norm_check.py; also the output projection's whole-row tilings), then quant_suite.py: bf16 and FP8 (decode
# steps at batch 1 and 32, W1, W2, the FP8 steps profiled), FP8 with the norm fusion off (INFERNEO_FP8_NORM_GEMV=0,
# batch 1) and FP8 with the output projection in the fastest whole-row tiling of the check (batch 1).
# Usage: OUT=... bash benchmarks/gpu/fp8_b1_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-200}
export PYTHONUNBUFFERED=1
export INFERNEO_FP8_NORM_GEMV=${INFERNEO_FP8_NORM_GEMV:-1}  # "fp8" is the norm-fused variant (default off since)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 120 python3 benchmarks/gpu/fp8_norm_check.py --out "$OUT" > "$OUT/fp8_norm_check.log" 2>&1
echo "fp8_norm_check rc=$?"; tail -40 "$OUT/fp8_norm_check.log"
TILES=$(python3 - "$OUT/fp8_norm_check.json" <<'PY'
import ast, json, sys
try:
    times = json.load(open(sys.argv[1]))["timing_us"]["o_proj"]
    best = min((t for t in times if ast.literal_eval(t)[1] == 4096), key=times.get)
except Exception:
    best = "(4, 4096, 8)"
n, k, w = ast.literal_eval(best)
print(json.dumps({"4096,4096,1": {"block_n": n, "block_k": k, "num_warps": w}}))
PY
)
echo "fp8-tiles: $TILES"
mkdir -p /tmp/quant_suite
timeout $((DEADLINE + 20)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --skip fp8-w8a8,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast --profile fp8 --fp8-tiles "$TILES" \
  --out /tmp/quant_suite 2>&1 | tail -c 9000
cp /tmp/quant_suite/quant_suite.json /tmp/quant_suite/quant_suite.log "$OUT/"
