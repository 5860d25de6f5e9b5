#!/usr/bin/env bash
# One device call on a machine of 2 GPUs (nvidia-h100-x2 / nvidia-h200-x2; issue 24): the tensor- and data-parallel
# paths of stop 65 through CUDA and NCCL, as their CPU tests check them over gloo (the tests' engines take the GPUs
# where they are present): quantized checkpoints at TP=2 (AWQ, GPTQ, compressed-tensors W4A16; FP8 per-tensor-static
# and block) against TP=1, a 4-bit checkpoint at PP=2, LoRA adapters at TP=2 against PEFT, an FP8 KV cache at TP=2,
# the control commands over two data-parallel replicas, images (LLaVA, Qwen2-VL, Gemma 3), prompt embeddings and
# GLM-4 at TP=2;
# and the TP=2 engine tests they build on.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/tp_new_paths_run.sh
source benchmarks/gpu/device_env.sh
python3 -c "import torch; assert torch.cuda.device_count() >= 2, 'needs 2 GPUs'; print(torch.cuda.device_count(), \
'x', torch.cuda.get_device_name())"
timeout ${CHECK_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_tensor_parallel_engine.py tests/test_tensor_parallel_quantized.py \
  "tests/test_lora.py::test_tensor_parallel_ranks_apply_their_parts_of_the_adapters" \
  "tests/test_kv_cache_fp8.py::test_fp8_kv_with_tensor_parallelism_equals_one_rank" \
  "tests/test_pipeline_parallel.py::test_pp2_with_a_4bit_checkpoint_equals_pp1" \
  "tests/test_weight_updates.py::test_data_parallel_replicas_all_take_the_commands" \
  "tests/test_vision_language.py::test_tensor_parallel_ranks_read_the_drivers_image_features" \
  "tests/test_qwen2_vl.py::test_tensor_parallel_ranks_take_the_drivers_features_and_3d_positions" \
  "tests/test_prompt_embeds.py::test_tensor_parallel_ranks_take_the_drivers_rows" \
  "tests/test_gemma3_vision.py::test_tensor_parallel_ranks_see_the_image_blocks" \
  "tests/test_more_families.py::test_glm4_tensor_parallel_two_ranks_match_hf" \
  2>&1 | tail -30 | tee "$OUT/tp_new_paths_check.log"
