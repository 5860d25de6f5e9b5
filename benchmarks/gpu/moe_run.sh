#!/usr/bin/env bash
# One device call for issue 19 (see README.md, "Mixture-of-experts"): the new architectures' HF parity on CUDA
# (fp32, single prompt), then moe_suite.py. If the Qwen3-MoE parity fails, the two fused CUDA kernels of the
# decode path are switched off for the suite and the log says so.
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-380}
export PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py \
  -k "test_single_prompt_matches_hf and (qwen3_moe or qwen3)" > "$OUT/parity_qwen3.log" 2>&1
if [ $? -ne 0 ]; then
  echo "qwen3/qwen3_moe parity failed on CUDA: fused q/k-norm rope and routing kernels OFF for the suite" | tee -a "$OUT/parity_qwen3.log"
  export INFERNEO_CUDA_FUSED_QK_NORM_ROPE=0 INFERNEO_CUDA_FUSED_ROUTING=0
fi
tail -3 "$OUT/parity_qwen3.log"
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py \
  -k "test_single_prompt_matches_hf and (gemma2 or gemma3 or gpt_oss or deepseek_v3)" > "$OUT/parity_new_archs.log" 2>&1
tail -3 "$OUT/parity_new_archs.log"
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/moe_suite.py --deadline "$DEADLINE" --out "$OUT" 2>&1 | tail -c 9000
