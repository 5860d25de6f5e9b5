"""FP8 KV cache on CUDA: the Triton kernels against the reference on de-quantized keys and values, and the time
of one decode-attention launch with an FP8 cache against a bfloat16 one at a long context.

    python benchmarks/gpu/check_kv_fp8.py [--context 8192] [--batch 1 32]

Prints one line per correctness case (stored bytes equal to PyTorch's quantization; relative error of the output)
and one per timing (microseconds per launch, the median of ``triton.testing.do_bench``).
"""

from __future__ import annotations

import argparse

import torch
import triton

from inferneo.attention.check_cases import (
    STANDARD_CASES,
    AttentionCase,
    build_step,
    compare_fp8_backend,
    fp8_case_scales,
    relative_error,
)
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.attention.triton_backend import TritonBackend
from inferneo.kernels import triton_attention as ops


def check_cases(device: torch.device) -> bool:
    """Every standard case in bfloat16 (and one in float32, one with split decoding); True when all pass."""
    runs = [(case, torch.bfloat16, TritonBackend()) for case in STANDARD_CASES]
    runs.append((STANDARD_CASES[-1], torch.float32, TritonBackend()))
    runs.append((AttentionCase("split", 8, 2, 128, 16, decode_lens=(1, 70, 900)), torch.bfloat16,
                 TritonBackend(decode_splits=4)))
    ok = True
    for case, dtype, backend in runs:
        step = build_step(case, dtype, device)
        out, ref, cache, ref_cache = compare_fp8_backend(backend, step, fp8_case_scales(case.num_kv_heads, device))
        same = torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
        err = relative_error(out, ref)
        passed = same and err < (2e-6 if dtype == torch.float32 else 1.5e-2)
        ok &= passed
        print(f"check {case.name:24s} {str(dtype):15s} stored bytes equal: {same}  relative error {err:.2e}  "
              f"{'ok' if passed else 'FAIL'}")
    return ok


def time_decode(device: torch.device, batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
                block_size: int = 16) -> None:
    """One decode launch over ``context`` cached tokens per request, bfloat16 cache against FP8."""
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 1
    gen = torch.Generator(device=device).manual_seed(0)
    tables = torch.randperm(num_blocks - 1, generator=gen, device=device)[: batch * blocks_per_seq]
    tables = tables.view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    base = torch.randn(2, num_blocks, kv_heads, block_size, head_dim, device=device)
    scales = KVCacheScales.ones(kv_heads, device)
    times = {}
    for name, cache in (("bf16", base.to(torch.bfloat16)), ("fp8", base.to(FP8_KV_DTYPE))):
        kv = scales if cache.dtype == FP8_KV_DTYPE else None
        times[name] = triton.testing.do_bench(
            lambda cache=cache, kv=kv: ops.paged_decode(q, cache, tables, lens, head_dim**-0.5, out, kv_scales=kv),
            warmup=25, rep=100) * 1000
    print(f"decode batch {batch:3d} context {context} heads {heads}/{kv_heads} d{head_dim}: bf16 {times['bf16']:.1f} us, "
          f"fp8 {times['fp8']:.1f} us ({times['fp8'] / times['bf16']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))
    if not args.skip_check and not check_cases(device):
        raise SystemExit("FP8 KV check failed")
    for batch in args.batch:  # Llama-3-8B's attention shape: 32 query heads, 8 KV heads of 128
        time_decode(device, batch, args.context, 32, 8, 128)


if __name__ == "__main__":
    main()
