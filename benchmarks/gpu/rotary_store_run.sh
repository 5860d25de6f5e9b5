#!/usr/bin/env bash
# One device call (2026-12-06): the Triton rotary kernel of layers without q/k norms (Llama, Mistral, Qwen2, gpt-oss,
# Mixtral) writes the step's keys and values itself, FP8 caches included, a token's heads over several programs at
# few tokens (_triton_elementwise.rotary_inplace(kv_cache=...), INFERNEO_CUDA_ROTARY_STORES_KV), so the backend
# launches no store_kv:
#   1. on CUDA, the cache bytes equal rotary_inplace + store_kv's (bf16 and FP8 caches, 1 to 256 tokens, eager and
#      from a CUDA graph), the rows equal the rotary-only kernel's;
#   2. quant_suite.py: Llama-2-7B decode steps at batch 1 and 32 (bf16, FP8 + FP8 KV, W4A16 + FP8 KV), each again
#      with the separate store launch (INFERNEO_CUDA_ROTARY_STORES_KV=0) and the fused store again, in one process;
#   3. float32 greedy parity with HF for the Llama-family tiny models on CUDA (tests/test_hf_parity.py).
# Usage (carry scratch/quant/whl): OUT=... bash benchmarks/gpu/rotary_store_run.sh
#   CHECK=0 leaves out step 1; BATCHES=1 times batch 1 only (a second round).
source benchmarks/gpu/device_env.sh
start=$SECONDS
if [ "${CHECK:-1}" != 0 ]; then
timeout 150 python3 - <<'PY' 2>&1 | tee "$OUT/rotary_store_check.log"
import torch
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.kernels import _triton_elementwise as k
from inferneo.kernels import triton_attention as ops
torch.manual_seed(0)
dev, dim = "cuda", 128
cos = torch.randn(4096, dim // 2, device=dev)
sin = torch.randn(4096, dim // 2, device=dev)
for n, heads, kv_heads in ((1, 32, 32), (1, 32, 8), (3, 32, 32), (32, 32, 32), (256, 32, 8), (1, 40, 40)):
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, device=dev, dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (n,), device=dev)
    slots = torch.randperm(64 * 16, device=dev)[:n]
    if n > 1:
        slots[n // 2] = -1
    scales = KVCacheScales(torch.rand(kv_heads, device=dev) + 0.25, torch.rand(kv_heads, device=dev) + 0.25)
    kv_end = (heads + kv_heads) * dim
    for fp8 in (False, True):
        dtype = FP8_KV_DTYPE if fp8 else torch.bfloat16
        sc = scales if fp8 else None
        rows = qkv.clone()
        k.rotary_inplace(rows, pos, cos, sin, heads + kv_heads, dim)
        want = torch.zeros(2, 64, kv_heads, 16, dim, device=dev, dtype=dtype)
        ops.store_kv(rows[:, heads * dim:kv_end].view(n, kv_heads, dim), rows[:, kv_end:].view(n, kv_heads, dim),
                     want, slots, kv_scales=sc)
        got_rows, got = qkv.clone(), torch.zeros_like(want)
        k.rotary_inplace(got_rows, pos, cos, sin, heads + kv_heads, dim, num_q_heads=heads, kv_cache=got,
                         slot_mapping=slots, kv_scales=sc)
        assert torch.equal(got_rows, rows) and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (n, fp8)
        g_rows, g_cache = qkv.clone(), torch.zeros_like(want)  # from a CUDA graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            k.rotary_inplace(g_rows, pos, cos, sin, heads + kv_heads, dim, num_q_heads=heads, kv_cache=g_cache,
                             slot_mapping=slots, kv_scales=sc)
        g_rows.copy_(qkv)
        g_cache.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_rows, rows) and torch.equal(g_cache.view(torch.uint8), want.view(torch.uint8)), (n, fp8)
        print("equal", n, heads, kv_heads, "fp8" if fp8 else "bf16", "groups", k.rotary_head_groups(n, kv_heads, False))
print("check ok")
PY
echo "check rc=$?"
fi
mkdir -p /tmp/qs
left=$((${CALL_SECONDS:-540} - (SECONDS - start)))
off="INFERNEO_CUDA_ROTARY_STORES_KV=0"
timeout $((left - 120)) python3 benchmarks/gpu/quant_suite.py --deadline $((left - 150)) --workloads "" \
  --decode-batches ${BATCHES:-1,32} --ab-batches ${BATCHES:-1,32} \
  --skip fp8,fp8-w8a8,fp8-nonorm,w4a16,w4a16-rows,w4a16-tinygemm,fp8-kv,gptfast \
  --ab "fp8kv-separate-store@fp8+fp8kv@$off" --ab "w4kv-separate-store@w4a16+fp8kv@$off" \
  --ab "bf16-separate-store@bf16@$off" --ab "fp8kv-fused-again@fp8+fp8kv" --ab "w4kv-fused-again@w4a16+fp8kv" \
  --out /tmp/qs > "$OUT/suite_out.log" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|copy|rror" /tmp/qs/quant_suite.log | cut -c1-220
cp /tmp/qs/quant_suite.json /tmp/qs/quant_suite.log "$OUT/" 2>/dev/null
left=$((${CALL_SECONDS:-540} - (SECONDS - start)))
if [ $left -gt 40 ]; then
  timeout $((left - 10)) python3 -m pytest -q -p no:cacheprovider tests/test_hf_parity.py \
    -k "test_single_prompt_matches_hf and (llama or mistral or qwen2 or gpt_oss or qwen3)" > "$OUT/parity.log" 2>&1
  echo "parity rc=$?"; tail -3 "$OUT/parity.log"
fi
