"""Device ceilings measured in the run, and the physical floors derived from them.

A decode step must at least read every weight once and every cached key and value of the batch once:
``floor = (weight bytes + KV bytes read) / copy bandwidth``. A prefill must at least do its matmul FLOPs:
``2 * non-embedding params * tokens`` plus the causal attention ``2 * 2 * layers * hidden * T^2 / 2`` per
prompt, over the measured bf16 matmul rate. Copy bandwidth counts bytes read plus bytes written, so reading
``N`` bytes at that rate takes ``N / bandwidth`` seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def measure_ceilings(device: torch.device, copy_gib: float = 2.0, matmul_n: int = 8192) -> Ceilings:
    """Device-to-device copy bandwidth (read + write bytes) and the bf16 matmul rate on random data."""
    n = int(copy_gib * 2**30)
    buffers = [torch.empty(n, dtype=torch.uint8, device=device) for _ in range(2)]
    copy_s = _time(lambda: buffers[1].copy_(buffers[0]), 10)
    buffers.clear()
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    mm_s = _time(lambda: a @ b, 10)
    return Ceilings(copy_bytes_per_s=2 * n / copy_s, matmul_flops_per_s=2 * matmul_n**3 / mm_s)


def _time(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


@dataclass(slots=True)
class ModelShape:
    """What the floors need to know of a model."""

    params: int  # all parameters
    embed_params: int  # input embedding table (read only for the batch's rows)
    num_layers: int
    hidden: int
    kv_bytes_per_token: int
    bytes_per_param: int = 2

    @property
    def weight_bytes_per_step(self) -> int:
        return (self.params - self.embed_params) * self.bytes_per_param

    @property
    def matmul_params(self) -> int:
        return self.params - self.embed_params


def model_shape(config: dict, dtype_bytes: int = 2) -> ModelShape:
    """The shape of a Llama-family model from its HF config values."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    per_layer = hidden * (heads * head_dim) * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter + 2 * hidden
    tied = config.get("tie_word_embeddings", False)
    params = layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden
    return ModelShape(params, 0 if tied else vocab * hidden, layers, hidden,
                      2 * layers * kv_heads * head_dim * dtype_bytes, dtype_bytes)


def decode_step_floor(shape: ModelShape, batch: int, context: float, ceil: Ceilings) -> float:
    """Seconds one decode step of ``batch`` requests with ``context`` cached tokens each needs at least."""
    return (shape.weight_bytes_per_step + batch * context * shape.kv_bytes_per_token) / ceil.copy_bytes_per_s


def prefill_floor(shape: ModelShape, num_prompts: int, prompt_len: int, ceil: Ceilings) -> float:
    """Seconds the prefill of ``num_prompts`` prompts of ``prompt_len`` tokens needs at least (compute bound)."""
    linear = 2 * shape.matmul_params * prompt_len
    attention = 2 * shape.num_layers * shape.hidden * prompt_len * prompt_len  # QK^T and PV, causal half
    return num_prompts * (linear + attention) / ceil.matmul_flops_per_s


def workload_floor(shape: ModelShape, num_prompts: int, prompt_len: int, output_len: int, concurrency: int,
                   ceil: Ceilings) -> dict:
    """Floor of a whole offline workload: its prefill plus its decode steps at the given concurrency."""
    waves = math.ceil(num_prompts / concurrency)
    steps = waves * output_len
    kv_read = num_prompts * sum(prompt_len + i for i in range(output_len)) * shape.kv_bytes_per_token
    decode_s = (steps * shape.weight_bytes_per_step + kv_read) / ceil.copy_bytes_per_s
    pre_s = prefill_floor(shape, num_prompts, prompt_len, ceil)
    total = pre_s + decode_s
    return {"prefill_floor_s": pre_s, "decode_floor_s": decode_s, "floor_s": total, "concurrency": concurrency,
            "floor_output_tok_per_s": num_prompts * output_len / total}


def timed(fn):
    """(result, seconds) of ``fn()`` with the device synchronized on both sides."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def sync() -> None:
    """Wait for the GPU (a no-op without one)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
