#!/usr/bin/env bash
# One device call for issue 20's FP8 targets (2026-12-04 evening, branch h-fp8c): fp8c_check.py (the decode
# kernel's weight prefetch equal bit for bit and its launch cost; FP8 decode launch settings at W2's shapes), then
# quant_suite.py in one process: bf16 and FP8 weights + FP8 KV cache (batch-1 step, profiles at 1 and 128 requests
# with the critical path per kernel, W2), then the A/Bs at batch 1 (INFERNEO_DECODE_WEIGHT_PREFETCH,
# INFERNEO_PDL_EARLY_EXTRA, on FP8 and on bf16), and W2 with an FP8 decode launch setting that beat the shipped one
# by 3% or more in fp8c_check.py (INFERNEO_DECODE_FP8_LAUNCH).
# Usage: OUT=... bash benchmarks/gpu/fp8c_run.sh [suite deadline s]
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-280}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/env.txt"
timeout 150 python3 benchmarks/gpu/fp8c_check.py --out "$OUT" > "$OUT/check.log" 2>&1
rc=$?
echo "fp8c_check rc=$rc"; tail -12 "$OUT/check.log"
if [ "$rc" != 0 ]; then echo "CHECKS FAILED (rc=$rc): the suite still runs; read check.log"; fi
WP=INFERNEO_DECODE_WEIGHT_PREFETCH; EX=INFERNEO_PDL_EARLY_EXTRA; FL=INFERNEO_DECODE_FP8_LAUNCH
W2AB=$(python3 - "$OUT/fp8c_check.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["w2"]["rows"]
for key, flag in (("fp8-cuda-core", "cc"), ("fp8-8warps", "w8"), ("fp8-cuda-core-8warps", "cc,w8"), ("fp8-2warps", "w2")):
    r = [(row[key]["us"], row["fp8"]["us"]) for k, row in rows.items() if k != "32x1040" and "us" in row.get(key, {})]
    if r and all(a < 0.97 * b for a, b in r) and all(row[key].get("ok") for row in rows.values() if key in row):
        print(flag)
PY
)
AB=()
for f in $W2AB; do AB+=(--ab "kv-launch-$f@fp8+fp8kv@$FL=$f@workloads=w2"); done
echo "W2 launch A/Bs: ${W2AB:-none}"
mkdir -p /tmp/qs
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --workloads w2 \
  --decode-batches 1 --profile bf16,fp8+fp8kv --profile-batches 1,128 \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --ab "kv-wp-o8@fp8+fp8kv@$WP=o,gu8" --ab "kv-early@fp8+fp8kv@$EX=norm,store" \
  --ab "kv-again@fp8+fp8kv" --ab "kv-wp-o16@fp8+fp8kv@$WP=o,gu16" \
  --ab "kv-early-wp-o8@fp8+fp8kv@$EX=norm,store@$WP=o,gu8" --ab "bf16-wp-o8@bf16@$WP=o,gu8" \
  --ab "bf16-early@bf16@$EX=norm,store" "${AB[@]}" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; tail -c 7000 "$OUT/suite_out.log"
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
