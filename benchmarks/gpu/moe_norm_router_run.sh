#!/usr/bin/env bash
# One device call for issue 19's batch-1 step with the post-attention norm inside the router GEMV (docs/benchmarks.md,
# "The post-attention norm inside the router GEMV"): moe_norm_router.py (checks against the launches replaced, in
# bf16 on CUDA, and the time per layer), the float32 HF parity of the MoE architectures on CUDA, then
# moe_suite.py --decode-only with INFERNEO_CUDA_NORM_ROUTER_GEMV off and on, in alternation while the time allows.
# Everything lands in $OUT/h-moe-results.tgz (plus a summary on stdout). About 4 minutes on one H200.
set -u
OUT=${OUT:?set OUT}
LIMIT=${1:-300}  # seconds for the whole script; a suite run starts only with 50 s left
export PYTHONUNBUFFERED=1
W="$OUT/work"
mkdir -p "$W"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$W/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$W/gpu.txt"
cat COMMIT 2>/dev/null | tee -a "$W/gpu.txt"
timeout 120 python3 benchmarks/gpu/moe_norm_router.py --out "$W" > "$W/norm_router_stdout.txt" 2>&1
echo "moe_norm_router rc=$?"; tail -n 14 "$W/norm_router_stdout.txt" | cut -c1-400
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py \
  -k "test_single_prompt_matches_hf and (qwen3_moe or qwen2_moe or mixtral or gpt_oss)" > "$W/parity.log" 2>&1
echo "parity rc=$? ($((SECONDS - start)) s)"; tail -n 2 "$W/parity.log"
n=0
for mode in off on off on off on; do
  n=$((n + 1))
  left=$((LIMIT - (SECONDS - start)))
  if [ "$left" -lt 50 ]; then echo "suite $n ($mode): skipped, ${left} s left"; continue; fi
  flag=0; [ "$mode" = on ] && flag=1
  d="$W/suite${n}_$mode"
  mkdir -p "$d"
  INFERNEO_CUDA_NORM_ROUTER_GEMV=$flag timeout $((left - 3)) \
    python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 160 --out "$d" > "$d/stdout.txt" 2>&1
  echo "suite $n (switches $flag) rc=$? ($((SECONDS - start)) s)"
  grep -E "^decode batch|kernels by device time|_kernel$" "$d/stdout.txt" | cut -c1-100 | head -n 16
done
tar czf "$OUT/h-moe-results.tgz" -C "$W" . && rm -rf "$W"
echo "done in $((SECONDS - start)) s"
