#!/usr/bin/env bash
# One device call (2026-12-04): the Triton KV store with a token's heads over several programs at few tokens
# (triton_attention.store_kv_heads_per_program) against one program a token (INFERNEO_STORE_KV_HEADS=64): the same
# bytes on CUDA (bf16 and FP8 caches, 1 to 256 tokens), then the Llama-2-7B decode steps of bf16 and FP8 weights +
# FP8 KV in one process, each way, in alternation (quant_suite.py --ab).
# Usage: OUT=... bash benchmarks/gpu/store_kv_split_run.sh
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/store_check.log"
import os, torch
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.kernels import triton_attention as ops
torch.manual_seed(0)
for n, heads, dim in ((1, 32, 128), (1, 8, 128), (3, 32, 128), (32, 32, 128), (256, 8, 128), (1, 40, 128)):
    k, v = torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16), torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:n]
    scales = KVCacheScales(torch.rand(heads, device="cuda") + 0.25, torch.rand(heads, device="cuda") + 0.25)
    for fp8 in (False, True):
        out = []
        for forced in ("", "64"):
            os.environ["INFERNEO_STORE_KV_HEADS"] = forced
            cache = torch.zeros(2, 64, heads, 16, dim, device="cuda", dtype=FP8_KV_DTYPE if fp8 else torch.bfloat16)
            ops.store_kv(k, v, cache, slots, kv_scales=scales if fp8 else None)
            out.append(cache.view(torch.uint8))
            if not forced:
                programs = -(-heads // ops.store_kv_heads_per_program(n, heads))  # the rule's, not the forced
        assert torch.equal(out[0], out[1]), (n, heads, fp8)
        print("equal bytes", n, heads, "fp8" if fp8 else "bf16", "programs/token", programs)
os.environ["INFERNEO_STORE_KV_HEADS"] = ""
print("check ok")
PY
mkdir -p /tmp/qs
timeout 300 python3 benchmarks/gpu/quant_suite.py --deadline 270 --workloads "" --decode-batches 1,32 --ab-batches 1,32 \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,w4a16+fp8kv,gptfast \
  --ab "fp8kv-one-program@fp8+fp8kv@INFERNEO_STORE_KV_HEADS=64" --ab "bf16-one-program@bf16@INFERNEO_STORE_KV_HEADS=64" \
  --ab "fp8kv-split-again@fp8+fp8kv" --ab "bf16-split-again@bf16" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|ceil|copy|error|Error" /tmp/qs/quant_suite.log | cut -c1-200
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/"
