"""The native CPU kernels of this tree against those of an earlier commit, timed interleaved in one process.

    python benchmarks/cpu_kernels_vs_baseline.py --baseline 7012f0f [--rounds 5] [--threads 2]

The baseline's ``csrc/cpu_kernels.cpp`` (``git show REV:...``) is built as a second extension beside this tree's
module, and every kernel of one engine step at the default model's shapes (SmolLM2-135M: 9 query heads and 3 KV
heads of 64, hidden 576, intermediate 1536) is timed through both, alternating the two modules call batch by call
batch, so load from other processes hits both alike. Prints, per kernel, the median milliseconds of one call for
each and their ratio (baseline / this tree: above 1 means this tree is faster).

Cases: decode attention of 64 requests over 192 cached tokens each (float32, bfloat16, float16 and FP8 caches),
the attention of a 2,048-token prefill step (32 prompts of 64 tokens, each token a query of the paged kernel),
SiLU-and-mul, RMSNorm with residual, and rotary, over 64 rows (a decode step) in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.kernels.cpu import cpu_build_tag, load_cpu_kernels

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
HIDDEN, INTER = 576, 1536


def load_baseline(rev: str):
    """The native module as commit ``rev`` had it, built under its own extension name."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:inferneo/csrc/cpu_kernels.cpp"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="inferneo-baseline-"))
    path = folder / "cpu_kernels_baseline.cpp"
    path.write_text(source)
    return load(name=f"inferneo_cpu_kernels_baseline_{cpu_build_tag()}", sources=[str(path)],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                              "-fassociative-math", "-fno-signed-zeros"],
                extra_ldflags=["-fopenmp"], verbose=False)


def attention_case(cache_dtype: torch.dtype, rows: int, lens: torch.Tensor, table_rows: torch.Tensor | None):
    """Arguments of one paged attention call: ``rows`` queries over a cache of random keys and values."""
    blocks_per_row = int(lens.max()) // BLOCK + 1
    num_tables = rows if table_rows is None else int(table_rows.max()) + 1
    num_blocks = num_tables * blocks_per_row + 1
    tables = torch.randperm(num_blocks - 1)[: num_tables * blocks_per_row].view(num_tables, blocks_per_row)
    base = torch.randn(2, KV_HEADS, num_blocks, BLOCK * HEAD_DIM)
    q_dtype = torch.float32 if cache_dtype == FP8_KV_DTYPE else cache_dtype
    q = torch.randn(rows, HEADS, HEAD_DIM, dtype=q_dtype)
    out = torch.empty_like(q)
    extra = {}
    if cache_dtype == FP8_KV_DTYPE:
        scales = KVCacheScales.ones(KV_HEADS, torch.device("cpu"))
        extra = dict(k_scale=scales.k, v_scale=scales.v)
    if table_rows is not None:
        extra["table_rows"] = table_rows
    return (q, base.to(cache_dtype), tables, lens, HEAD_DIM**-0.5, out), extra


def cases():
    """(name, function of a module that runs the case once)."""
    torch.manual_seed(0)
    decode_lens = torch.full((64,), 192, dtype=torch.long)
    prompts, length = 32, 64
    prefill_rows = torch.arange(prompts).repeat_interleave(length)
    prefill_lens = torch.arange(1, length + 1).repeat(prompts)
    found = []
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
                        ("fp8 e4m3", FP8_KV_DTYPE)]:
        args, extra = attention_case(dtype, 64, decode_lens, None)
        found.append((f"decode attention, {name} cache", lambda m, a=args, e=extra: m.paged_decode_attention(*a, **e)))
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        args, extra = attention_case(dtype, prompts * length, prefill_lens, prefill_rows)
        found.append((f"prefill attention 32x64, {name}", lambda m, a=args, e=extra: m.paged_decode_attention(*a, **e)))
    from inferneo.model_executor.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(HEAD_DIM, 2048, 10000.0)
    positions = torch.randint(0, 2048, (64,))
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        gate_up = torch.randn(64, 2 * INTER, dtype=dtype)
        x, res, w = (torch.randn(64, HIDDEN, dtype=dtype) for _ in range(3))
        qkv = torch.randn(64, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
        found.append((f"silu_and_mul 64x{INTER}, {name}", lambda m, g=gate_up: m.silu_and_mul(g)))
        found.append((f"rms_norm+residual 64x{HIDDEN}, {name}", lambda m, x=x, r=res, w=w: m.rms_norm(x, r, w, 1e-5)))
        found.append((f"rotary 64 rows, {name}",
                      lambda m, q=qkv: m.rotary_inplace(q, positions, rope.cos_cache, rope.sin_cache,
                                                        HEADS + KV_HEADS, HEAD_DIM)))
    return found


def timed(fn, module, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(module)
    return (time.perf_counter() - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit whose kernels to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    current, baseline = load_cpu_kernels(), load_baseline(args.baseline)
    if current is None:
        print("this tree's native kernels do not build here")
        return 1
    print(f"this tree: {current.vector_isa()}; baseline {args.baseline}; {args.threads} threads")
    for name, fn in cases():
        for module in (baseline, current):
            fn(module)  # warm-up
        start = time.perf_counter()
        fn(current)
        calls = max(1, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6))))  # ~20 ms a batch
        times = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            times["baseline"].append(timed(fn, baseline, calls))
            times["current"].append(timed(fn, current, calls))
        base, cur = statistics.median(times["baseline"]), statistics.median(times["current"])
        print(f"{name:42s} baseline {base * 1e3:8.3f} ms  this tree {cur * 1e3:8.3f} ms  x{base / cur:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
