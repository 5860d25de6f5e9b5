#!/usr/bin/env bash
# One device call: LongRoPE's per-sequence switch (short, crossing and long prompts; chunked, preempted, asynchronous,
# speculative) and Phi-3's HF parity through the CUDA path (the rotary kernels read the table's added long rows).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/longrope_check_run.sh
source benchmarks/gpu/device_env.sh
python3 -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
timeout ${CHECK_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider tests/test_rope_scaling.py tests/test_hf_parity.py \
  -k "switches or longrope or phi3" 2>&1 | tail -15 | tee "$OUT/longrope_check.log"
