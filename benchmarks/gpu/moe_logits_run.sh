#!/usr/bin/env bash
# One device call for issue 19's batch-1 step with the routing inside the expert kernels (docs/benchmarks.md,
# "The routing inside the expert kernels"): moe_logits_routing.py (the new kernels against the launches they
# replace, on CUDA in bf16: equal results, graph replays, time per layer), the float32 HF parity of the MoE
# architectures on CUDA, then moe_suite.py --decode-only with INFERNEO_CUDA_MOE_LOGITS_ROUTING off and on, in
# alternation (off, on, off, on) while the time allows. Everything lands in $OUT/h-moe-results.tgz (plus a summary
# on stdout). About 6 minutes on one H200.
set -u
OUT=${OUT:?set OUT}
LIMIT=${1:-360}  # seconds for the whole script; a suite run starts only with 80 s left
export PYTHONUNBUFFERED=1
W="$OUT/work"
mkdir -p "$W"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$W/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$W/gpu.txt"
cat COMMIT 2>/dev/null | tee -a "$W/gpu.txt"
timeout 150 python3 benchmarks/gpu/moe_logits_routing.py --out "$W" > "$W/logits_routing_stdout.txt" 2>&1
echo "moe_logits_routing rc=$?"; tail -n 12 "$W/logits_routing_stdout.txt"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py \
  -k "test_single_prompt_matches_hf and (qwen3_moe or qwen2_moe or mixtral or gpt_oss)" > "$W/parity.log" 2>&1
echo "parity rc=$? ($((SECONDS - start)) s)"; tail -n 3 "$W/parity.log"
n=0
for mode in off on off on; do
  n=$((n + 1))
  left=$((LIMIT - (SECONDS - start)))
  if [ "$left" -lt 80 ]; then echo "suite $n ($mode): skipped, ${left} s left"; continue; fi
  flag=0; [ "$mode" = on ] && flag=1
  d="$W/suite${n}_$mode"
  mkdir -p "$d"
  INFERNEO_CUDA_MOE_LOGITS_ROUTING=$flag timeout $((left - 5)) python3 benchmarks/gpu/moe_suite.py --decode-only \
    --deadline 160 --out "$d" > "$d/stdout.txt" 2>&1
  echo "suite $n (INFERNEO_CUDA_MOE_LOGITS_ROUTING=$flag) rc=$? ($((SECONDS - start)) s)"
  grep -E "^decode batch|kernels by device time|_kernel$|engine ready" "$d/stdout.txt" | cut -c1-160 | head -n 22
done
tar czf "$OUT/h-moe-results.tgz" -C "$W" . && rm -rf "$W"
echo "done in $((SECONDS - start)) s"
