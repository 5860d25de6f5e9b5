"""Time every linear layer of one step of the default model on CPU: GGUF blocks (native kernels) against the same
weights de-quantized to float32 / bfloat16 and packed as the engine packs them (oneDNN or the panel kernel).

The layers are the bundled SmolLM2-135M GGUF's own (30 x q/k/v, o, gate/up, down in Q4_1, plus the tied LM head
in Q8_0), so each step streams the model's weights from memory as the engine does. The two paths alternate
within each repeat, and the best of the repeats is kept, to damp a busy machine's noise.

    python3 benchmarks/cpu_gguf_step.py [--rows 1,4,16,32,64,128] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.layers.cpu_linear import pack_linears
from inferneo.quantization.gguf import block_matmul_for
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, dequantize_blocks


def gguf_layers() -> list[tuple[torch.Tensor, int]]:
    """(blocks, ggml type) of every linear of the default model, the tied head last."""
    from inferneo import LLM
    from inferneo.quantization.gguf import ggml_blocks

    llm = LLM(dtype="float32", kv_cache_memory="8MiB", max_model_len=256)
    model = llm.engine.runner.model
    layers = []
    for module in model.modules():
        for seg in getattr(module, "gguf_segments", ()):
            layers.append((ggml_blocks(module, seg).clone(), seg.fmt.qtype))  # the file's layout, even if repacked
    layers.append((model.embed_tokens.ggml_blocks().clone(), model.embed_tokens.fmt.qtype))  # file layout too
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,4,16,32,64,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = gguf_layers()
    matmul = block_matmul_for(torch.device("cpu"), KernelConfig())
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        dense = nn.ModuleList()
        for blocks, qtype in layers:
            weight = dequantize_blocks(blocks, qtype)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
            linear.weight.data.copy_(weight)
            dense.append(linear)
        holder = nn.Module()
        holder.layers = dense
        pack_linears(holder, KernelConfig())
        for rows in map(int, args.rows.split(",")):
            inputs = {k: torch.randn(rows, k, dtype=dtype) for k in {lin.in_features for lin in holder.layers}}
            best = {"gguf": float("inf"), "dense": float("inf")}
            for _ in range(args.repeats):
                for name in best:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        if name == "gguf":
                            for (blocks, qtype), lin in zip(layers, holder.layers, strict=True):
                                matmul(inputs[lin.in_features], blocks, KEPT_FORMATS[qtype])
                        else:
                            for lin in holder.layers:
                                lin(inputs[lin.in_features])
                    best[name] = min(best[name], time.perf_counter() - start)
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "gguf_ms": round(best["gguf"] * 1e3, 2),
                   "dense_ms": round(best["dense"] * 1e3, 2),
                   "gguf_speedup": round(best["dense"] / best["gguf"], 2),
                   "dense_kind": type(holder.layers[0]).__name__}
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
