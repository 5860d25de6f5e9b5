#!/usr/bin/env bash
# One device call for issue 20's comparison with gpt-fast (docs/benchmarks.md, "Quantization (issue 20)"):
# quant_suite.py's bf16 and FP8 sections (decode steps at batch 1 and 32, W1, W2; the FP8 GEMV tiling file as
# committed) and gpt-fast's int8 and bf16 batch-1 decode steps (its files carried in scratch/gpt-fast) in one
# process, then, if the call's budget leaves time, the W4A16 decode steps alone in a second process.
# On 2026-12-03 the bf16 and FP8 sections took 132 s and gpt-fast's int8 mode 174 s (its compile included); each
# gpt-fast mode starts only with 150 s of the suite's deadline left, so both modes need a deadline of about 490 s.
# Usage: OUT=... bash benchmarks/gpu/quant_peer_run.sh [total budget s] [suite deadline s]
set -u
OUT=${OUT:?set OUT}
BUDGET=${1:-540}
DEADLINE=${2:-$((BUDGET - 40))}
export PYTHONUNBUFFERED=1
start=$(date +%s)
{ date -u +"%Y-%m-%d %H:%M:%S UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
mkdir -p /tmp/qs /tmp/qs4
timeout $((BUDGET - 5)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" \
  --skip fp8-w8a8,w4a16,fp8-kv,fp8+fp8kv,w4a16+fp8kv --out /tmp/qs > /tmp/qs/run.txt 2>&1
echo "quant_suite rc=$?"
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log /tmp/qs/run.txt "$OUT/" 2>/dev/null
left=$((BUDGET - ($(date +%s) - start)))
if [ "$left" -ge 70 ]; then
  timeout $((left - 5)) python3 benchmarks/gpu/quant_suite.py --deadline $((left - 20)) --workloads "" \
    --skip bf16,fp8,fp8-w8a8,fp8-kv,fp8+fp8kv,w4a16+fp8kv,gptfast --out /tmp/qs4 > /tmp/qs4/run.txt 2>&1
  echo "w4a16 rc=$?"
  cp /tmp/qs4/quant_suite.json "$OUT/w4a16_suite.json"; cp /tmp/qs4/quant_suite.log "$OUT/w4a16_suite.log"
else
  echo "w4a16: skipped ($left s left)"
fi
grep -v -i "warn\|^$" /tmp/qs/quant_suite.log | cut -c1-200 | tail -40
grep -i "decode batch\|error" /tmp/qs4/quant_suite.log 2>/dev/null | cut -c1-200
echo "total $(($(date +%s) - start)) s"
