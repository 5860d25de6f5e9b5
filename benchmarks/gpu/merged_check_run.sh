#!/usr/bin/env bash
# One device call on main's tree as shipped: the CUDA tests and checks first, then the decode steps with every
# default as shipped, so that changes landed since the last GPU run are confirmed on the tree users get.
#   1. tests on CUDA: the GPU runner's logic, the Triton ops, and float32 greedy tokens against HF for the dense and
#      MoE families (tests/test_hf_parity.py picks CUDA when it is there);
#   2. GGUF on CUDA: check_gguf.py (kernels, a Q4_K_M engine against float32) and gguf_auto_dtype_check.py;
#   3. decode steps at batch 1 and 32: Llama-2-7B bf16, FP8 and FP8 + FP8 KV (quant_suite.py), then Qwen3-30B-A3B
#      (moe_suite.py --decode-only).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/merged_check_run.sh
# STEPS=0 leaves out part 3; QUANT_SKIP replaces quant_suite's skip list.
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/tests" "$OUT/gguf" "$OUT/quant" "$OUT/moe"

timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_runner_logic.py tests/test_triton_ops.py \
  tests/test_hf_parity.py -k "not test_hf_parity or (test_single_prompt_matches_hf and (llama or qwen3 or qwen2_moe \
or gpt_oss or mixtral or gemma3))" > "$OUT/tests/pytest.log" 2>&1
echo "tests rc=$?"; tail -n 15 "$OUT/tests/pytest.log"

timeout 90 python3 benchmarks/gpu/check_gguf.py --out "$OUT/gguf" > "$OUT/gguf/check_gguf.out" 2>&1
echo "check_gguf rc=$?"; tail -n 8 "$OUT/gguf/check_gguf.out"
timeout 90 python3 benchmarks/gpu/gguf_auto_dtype_check.py --out "$OUT/gguf" > "$OUT/gguf/auto_dtype.out" 2>&1
echo "gguf_auto_dtype rc=$?"; tail -n 8 "$OUT/gguf/auto_dtype.out"

[ "${STEPS:-1}" = 0 ] && exit 0
QUANT_SKIP=${QUANT_SKIP:-fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16+fp8kv,w4a16-rows,w4a16-tinygemm,gptfast}
timeout 200 python3 benchmarks/gpu/quant_suite.py --deadline 190 --workloads "" --decode-batches 1,32 \
  --skip "$QUANT_SKIP" --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -v "^ \{4,\}[0-9]" "$OUT/quant/quant_suite.out" | tail -c 2500
timeout 170 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 160 --out "$OUT/moe" \
  > "$OUT/moe/moe_suite.out" 2>&1
echo "moe_suite rc=$?"; tail -c 2500 "$OUT/moe/moe_suite.out"
