#!/usr/bin/env bash
# One device call for issue 19's batch-1 decode step (docs/benchmarks.md, "Fewer launches a layer"): the fused
# launches checked and timed (moe_fused_launches.py), the few-token expert tiles and GEMV swept and written
# (moe_decode_sweep.py --write-configs), the float32 HF parity on CUDA of the architectures whose kernels changed
# (the MoE models: norm + router + top-k; Qwen3, Qwen3-MoE and Gemma 3: q/k norm + rotary + KV store), then
# moe_suite.py --decode-only (steps at batch 1 and 32 and the eager batch-1 kernel profile). A failing step is
# logged and the next one still runs. About 4 minutes on one H200.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
timeout 45 python3 benchmarks/gpu/moe_fused_launches.py --out "$OUT" 2>&1 | tail -n 20
timeout 50 python3 benchmarks/gpu/moe_decode_sweep.py --out "$OUT" --write-configs > "$OUT/sweep_stdout.txt" 2>&1
grep -E "best|wrote|call T=|Error|error" "$OUT/sweep_stdout.txt" | tail -n 16
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py -k "test_single_prompt_matches_hf and \
(qwen3 or qwen2_moe or mixtral or gpt_oss or gemma3)" > "$OUT/parity.log" 2>&1
echo "parity rc=$?"; tail -n 3 "$OUT/parity.log"
timeout 140 python3 benchmarks/gpu/moe_suite.py --decode-only --deadline 110 --out "$OUT" 2>&1 | tail -c 5000
