"""GGUF on CUDA: the Triton GEMM over ggml blocks against ``F.linear`` on the de-quantized weights, its speed beside
a bf16 ``F.linear`` of the same shape, and a tiny Llama GGUF's greedy tokens kept quantized against de-quantized.

    python3 benchmarks/gpu/check_gguf.py --out DIR      # writes DIR/check_gguf.json (after each section)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from inferneo.kernels.triton_gguf import gguf_matmul
from inferneo.quantization.gguf import random_blocks
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, dequantize_blocks


def _time_ms(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check_kernels(result: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for fmt in KEPT_FORMATS.values():
        n = k = 4096
        blocks = torch.zeros(n, fmt.row_bytes(k), dtype=torch.uint8, device="cuda")
        random_blocks(blocks, fmt, gen)
        weight = dequantize_blocks(blocks, fmt.qtype)
        entry = {}
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 16, 128):
                x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
                ref = F.linear(x.float(), weight)
                got = gguf_matmul(x, blocks, fmt.qtype).float()
                entry[f"{dtype}_m{m}_rel_err"] = ((got - ref).norm() / ref.norm()).item()
        dense = weight.bfloat16()
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            entry[f"bf16_m{m}_gguf_ms"] = _time_ms(lambda x=x, b=blocks, q=fmt.qtype: gguf_matmul(x, b, q))
            entry[f"bf16_m{m}_dense_ms"] = _time_ms(lambda x=x, w=dense: F.linear(x, w))
        result["kernels"][fmt.name] = entry


def check_engine(result: dict) -> None:
    from inferneo import LLM, SamplingParams
    from inferneo.testing import make_tiny_checkpoint, make_tiny_gguf

    folder = Path(tempfile.mkdtemp())
    hf_dir = make_tiny_checkpoint(folder / "hf", "llama", hidden_size=256)
    path = make_tiny_gguf(hf_dir, folder / "tiny-Q4_K_M.gguf", "Q4_K_M")
    prompts = [[5 + i, 17, 33 + 2 * i, 90, 7 * i + 3] for i in range(8)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = {}
    for mode in ("0", "1"):
        os.environ["INFERNEO_GGUF_DEQUANTIZE"] = mode
        llm = LLM(str(path), dtype="float32", device="cuda", max_model_len=128, enforce_eager=True)
        runs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        del llm
    result["engine_q4_k_m_fp32_tokens_equal"] = runs["0"] == runs["1"]
    result["engine_tokens"] = runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(), "kernels": {}}
    start = time.perf_counter()
    for section in (check_kernels, check_engine):
        try:
            section(result)
        except Exception as exc:  # record and go on: one call of the device machine
            result[f"{section.__name__}_error"] = repr(exc)
        result["elapsed_s"] = time.perf_counter() - start
        (args.out / "check_gguf.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
