"""Time the two prompt-side CPU changes against what they replaced, with SmolLM2-135M's shapes by default.

1. Attention over prompt tokens: the native paged kernel (every prompt token one query over its request's
   blocks, the CPU backend's path) against PyTorch's SDPA on contiguous ``[batch, heads, len, dim]`` tensors
   (the old path; the engine also had to stack the spans first, which this does not count). Batches hold 2,048
   prompt tokens in total, as one engine step does, in prompts of 16 to 2,048 tokens.
2. The MLP (gate/up matmul, SiLU-and-mul, down matmul) over M rows for 30 layers' weights: one pass against
   passes of rows (``mlp_row_chunk``: 128 rows in float32, 256 in bfloat16 for these shapes).

Prints one JSON line per measurement (milliseconds; the best of ``--repeats`` runs).

    python3 benchmarks/cpu_prefill_step.py [--threads 2] [--dtype float32|bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.nn.functional as F
from offline_throughput import emit_json
from torch import nn

from inferneo.kernels.cpu import load_cpu_kernels
from inferneo.model_executor.device_kernels import NativeSiluAndMul
from inferneo.model_executor.layers.basic import SiluAndMul
from inferneo.model_executor.layers.cpu_linear import PackedLinear, PanelLinear, mlp_row_chunk, panel_kernels


def best_ms(repeats: int, fn, *args, **kwargs) -> float:
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def attention_rows(args, dtype: torch.dtype) -> list[dict]:
    ops = load_cpu_kernels()
    heads, kv_heads, dim, block = args.heads, args.kv_heads, args.head_dim, 16
    rows = []
    for length in (16, 64, 256, 1024, 2048):
        batch = max(1, 2048 // length)
        tokens, blocks_per = batch * length, -(-length // block)
        cache = torch.zeros(2, kv_heads, batch * blocks_per + 1, block * dim, dtype=dtype)
        q = torch.randn(tokens, heads, dim).to(dtype)
        k = torch.randn(tokens, kv_heads, dim).to(dtype)
        v = torch.randn(tokens, kv_heads, dim).to(dtype)
        pos = torch.arange(length)
        slots = (torch.arange(batch)[:, None] * blocks_per * block + pos[None, :]).flatten()
        ops.store_kv(k, v, cache, slots)
        tables = torch.arange(batch * blocks_per).view(batch, blocks_per)
        table_rows = torch.arange(batch).repeat_interleave(length)
        lens = (pos + 1).repeat(batch)
        out = torch.empty_like(q)
        scale = dim**-0.5
        qs, ks, vs = (x.view(batch, length, -1, dim).transpose(1, 2).contiguous() for x in (q, k, v))
        paged = best_ms(args.repeats, ops.paged_decode_attention, q, cache, tables, lens, scale, out, table_rows)
        sdpa = best_ms(args.repeats, F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, scale=scale,
                       enable_gqa=heads != kv_heads)
        reference = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True, scale=scale,
                                                   enable_gqa=heads != kv_heads)
        error = (out.float().view(batch, length, heads, dim).transpose(1, 2) - reference).abs().max().item()
        rows.append({"part": "attention", "prompt_len": length, "prompts": batch, "paged_ms": round(paged, 3),
                     "sdpa_ms": round(sdpa, 3), "sdpa_over_paged": round(sdpa / paged, 2),
                     "max_abs_diff": error})
    return rows


def mlp_rows(args, dtype: torch.dtype) -> list[dict]:
    ops = panel_kernels(dtype)

    def pack(layer: nn.Linear) -> nn.Module:
        layer = layer.to(dtype)
        return PanelLinear(layer, ops) if ops is not None else PackedLinear(layer)

    native = load_cpu_kernels()
    silu_and_mul = NativeSiluAndMul(native) if native is not None else SiluAndMul()  # as the engine puts in place
    hidden, inter = args.hidden, args.intermediate
    layers = [(pack(nn.Linear(hidden, 2 * inter, bias=False)), pack(nn.Linear(inter, hidden, bias=False)))
              for _ in range(args.layers)]

    def run(x: torch.Tensor, chunk: int | None) -> None:  # the engine's MLP.forward, with the pass size given
        for gate_up, down in layers:
            if chunk is None:
                down(silu_and_mul(gate_up(x)))
                continue
            out = x.new_empty(x.shape[0], hidden)
            for s in range(0, x.shape[0], chunk):
                down(silu_and_mul(gate_up(x[s : s + chunk])), out=out[s : s + chunk])

    rows = []
    for m in (512, 1024, 2048, 4096):
        x = torch.randn(m, hidden).to(dtype)
        whole = best_ms(args.repeats, run, x, None)
        chunk = mlp_row_chunk(x, *layers[0]) or m
        passes = best_ms(args.repeats, run, x, chunk)
        rows.append({"part": "mlp", "rows": m, "layers": args.layers, "one_pass_ms": round(whole, 2),
                     "pass_rows": chunk, "row_passes_ms": round(passes, 2), "speedup": round(whole / passes, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__}
    with torch.inference_mode():
        rows = attention_rows(args, dtype) + mlp_rows(args, dtype)
    for row in rows:
        emit_json({**row, **stamp}, args.out)


if __name__ == "__main__":
    main()
