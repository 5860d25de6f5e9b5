#!/usr/bin/env bash
# One device call for the persistent one-row W4A16 prototype (benchmarks/gpu/w4a16_h2_persistent.py): its launches
# on Llama-2-7B's K = 4096 layers (2-8 rows a tile, 2-4 warps, 2-16 programs a multiprocessor), each checked
# against float32 F.linear and timed in CUDA graphs beside the shipped h2 launch.
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/w4a16_persistent_run.sh
source benchmarks/gpu/device_env.sh
timeout ${PERSISTENT_TIMEOUT:-400} python3 benchmarks/gpu/w4a16_h2_persistent.py --out "$OUT/persistent.jsonl" \
  > "$OUT/persistent.log" 2>&1
echo "w4a16_h2_persistent rc=$?"; grep -vE "Warning|warn" "$OUT/persistent.log" | tail -12 | cut -c1-220
