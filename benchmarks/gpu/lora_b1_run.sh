#!/usr/bin/env bash
# One device call for issue 22's LoRA batch-1 step (see docs/benchmarks.md, issue 22): the one-row LoRA path
# checked on the GPU (lora_b1_check.py: kernels against the batched kernels and float32, then a tiny bf16 model
# with the fused rows on and off), the LoRA part of issue22_check.py (float32, against HF + PEFT), then
# lora_suite.py (base vs 8 adapters: decode steps at batch 1 and 32, W1 (WORKLOADS, default w1), and the LoRA
# engine's decode steps with the fused rows off). Usage: lora_b1_run.sh [TOTAL_S [WORKLOADS]]: the suite gets what is left
# of TOTAL_S (default 270) after the checks, less 15 s.
set -u
OUT=${OUT:?set OUT}
TOTAL=${1:-270}
WORKLOADS=${2-w1}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 90 python3 benchmarks/gpu/lora_b1_check.py --out "$OUT" > "$OUT/lora_b1_check.log" 2>&1
echo "lora_b1_check rc=$?"; tail -c 2500 "$OUT/lora_b1_check.log"
timeout 75 python3 benchmarks/gpu/issue22_check.py --lora-only --out "$OUT" > "$OUT/issue22_check.log" 2>&1
echo "issue22_check rc=$?"; tail -c 600 "$OUT/issue22_check.log"
DEADLINE=$((TOTAL - SECONDS - 15))
echo "lora_suite deadline ${DEADLINE} s"
SUITE=$(mktemp -d)  # its adapters (hundreds of MB) stay out of $OUT
timeout $((DEADLINE + 10)) python3 benchmarks/gpu/lora_suite.py --deadline "$DEADLINE" --compare-batched-rows \
  --workloads "$WORKLOADS" \
  --out "$SUITE" > "$OUT/lora_suite.stdout" 2>&1
echo "lora_suite rc=$?"; cp "$SUITE"/lora_suite.json "$SUITE"/lora_suite.log "$OUT"/; tail -c 3000 "$OUT/lora_suite.log"
