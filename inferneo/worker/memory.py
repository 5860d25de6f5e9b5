"""Sizing the KV cache from what the device has left after the weights and a profiling forward pass."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inferneo.attention import AttentionMetadata, PrefillSpan
from inferneo.attention.kv_spec import allocate_kv_caches
from inferneo.model_executor.pipeline import stage_forward

if TYPE_CHECKING:
    from inferneo.worker.model_runner import ModelRunner


@dataclass(slots=True, frozen=True)
class MemoryProfile:
    """Device memory readings, in bytes, taken after weights load and a worst-case forward pass ran.

    ``in_use`` is everything the device reports as taken once the profiling pass's temporaries were released
    (CUDA context, weights, other processes); ``peak_activation`` is how far the pass's allocations rose above
    what stayed allocated afterwards.
    """

    total: int
    in_use: int
    peak_activation: int


def kv_cache_budget(profile: MemoryProfile, utilization: float, reserve: int = 0) -> int:
    """Bytes the KV cache may take: ``total * utilization - in_use - peak_activation - reserve`` (not below 0).

    ``reserve`` covers what is allocated after the KV cache and not seen by the profiling pass (the spare
    padding block, CUDA graph pools).
    """
    budget = int(profile.total * utilization) - profile.in_use - profile.peak_activation - reserve
    return max(budget, 0)


def profile_peak_memory(runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int) -> MemoryProfile:
    """Run a worst-case step (a full token budget of prefill, logits for ``max_num_seqs`` rows) and read memory."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    dummy_prefill(runner, max_num_batched_tokens, max_num_seqs)
    dummy_image(runner)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(total=total, in_use=total - free, peak_activation=max(peak - allocated, 0))


@torch.inference_mode()
def dummy_image(runner: ModelRunner) -> torch.Tensor | None:
    """A vision-language model's vision tower over one blank image (a step encodes its images one at a time), so
    that the profile's peak holds its activations too; None for a text model."""
    encode = getattr(runner.model, "encode_image", None)
    if encode is None:
        return None
    return encode(*runner.model.blank_image(runner.device))


@torch.inference_mode()
def dummy_prefill(runner: ModelRunner, num_tokens: int, num_seqs: int, top_p_sort: bool = True) -> torch.Tensor | None:
    """One forward pass over ``num_tokens`` prompt tokens (in spans no longer than the context) plus logits for
    ``num_seqs`` rows and (``top_p_sort``) the sampler's top-p sort of them, writing K/V into a small scratch cache.
    Returns the logits (None on a tensor-parallel worker, which sends its share to the driver)."""
    bs, device = runner.block_size, runner.device
    span_len = max(1, runner.max_model_len - 1)
    lengths = [min(span_len, num_tokens - s) for s in range(0, num_tokens, span_len)]
    spans, slots, positions = [], [], []
    block = 0
    for start, n in zip(itertools.accumulate([0, *lengths[:-1]]), lengths, strict=True):
        num_blocks = -(-n // bs)
        table = torch.arange(block, block + num_blocks, device=device)
        spans.append(PrefillSpan(start, n, 0, table))
        slots.append(torch.arange(n, device=device) + block * bs)
        positions.append(torch.arange(n, device=device))
        block += num_blocks
    # One scratch tensor per distinct layer shape (this rank's heads), shared by the layers of that shape.
    scratch = allocate_kv_caches(runner.kv_cache_specs, block, bs, runner.kv_dtype, device, share=True)
    metadata = AttentionMetadata(block_size=bs, num_decode_tokens=0, slot_mapping=torch.cat(slots),
                                 decode_block_tables=None, decode_seq_lens=None, prefills=spans)
    runner.backend.prepare(metadata)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    stage = getattr(runner.model, "pipeline_stage", None)
    if stage is None:
        hidden = runner.model(ids, torch.cat(positions), scratch, metadata)
    else:  # one pipeline stage alone (zeros stand in for the activations a later stage receives)
        hidden = stage_forward(runner.model, ids, torch.cat(positions), scratch, metadata)[0]
        if not stage.is_last:
            return None
    rows = hidden[-min(num_seqs, num_tokens):]
    logits = runner.model.compute_logits(rows)  # None on a tensor-parallel worker: the driver samples
    if logits is not None and top_p_sort:
        logits.sort(dim=-1)[0].softmax(dim=-1).cumsum(dim=-1)  # the sampler's top-p path, the heaviest one
    return logits


def warm_up(runner: ModelRunner, num_tokens: int, num_seqs: int) -> float:
    """Run :func:`dummy_prefill` once before the first request and return its seconds (the CPU path).

    A process's first full-budget steps pay for memory they have never touched: the heap grows to the steps' working
    size (``cpu_tuning.keep_freed_memory_mapped`` keeps it from then on, but ``release_freed_memory`` handed the
    loading's pages back) and the kernel zeroes each new page on first touch. On a Zen 5, 5% of a first offline run's
    samples were ``clear_page``, against 0.1% in the run after it, and the first run was 8-15% slower. One worst-case
    pass at start-up grows the heap before the first request, as CUDA's profiling pass does on GPUs. Without the
    top-p sort: its buffers (12 bytes a logit: 150 MB at 256 rows of a 49,152-token vocabulary) would stay resident
    for requests that may never ask for top-p.
    """
    start = time.perf_counter()
    dummy_prefill(runner, num_tokens, num_seqs, top_p_sort=False)
    return time.perf_counter() - start
