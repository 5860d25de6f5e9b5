#!/usr/bin/env bash
# One device call: stop 62's new paths through CUDA, as the CPU tests check them (the tests' engines take the GPU
# where one is present): GGUF MoE experts held in ggml blocks (the per-expert Triton block matmul, CUDA graphs off),
# BERT-family encoders and cross-encoders (bidirectional SDPA, each input whole), beam search (the front end over the
# CUDA engine), and stop 63's: decoder sequence classifiers (the float32 score head beside a bfloat16 body, TP off)
# and the prefix cache's salts (cache_salt).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/new_paths_check_run.sh
source benchmarks/gpu/device_env.sh
python3 -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
timeout ${CHECK_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_gguf_moe_blocks.py tests/test_encoder_embeddings.py tests/test_cross_encoder.py tests/test_beam_search.py \
  tests/test_decoder_classifier.py tests/test_cache_salt.py \
  2>&1 | tail -25 | tee "$OUT/new_paths_check.log"
