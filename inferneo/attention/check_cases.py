"""Random paged-attention steps for checking a backend against the PyTorch reference.

A case is a head configuration plus a list of decode context lengths and prefill spans ``(context_len,
num_tokens)``. ``build_step`` lays the requests out over randomly permuted blocks of a random cache (never
zeros) and returns everything a backend's ``forward`` needs; ``compare_backends`` runs a backend and the reference
on the same step and returns both outputs and both caches (the backend's in the reference layout);
``compare_fp8_backend`` does the same for an FP8 cache, against the reference on de-quantized keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inferneo.attention.backend import AttentionBackend, AttentionMetadata, PrefillSpan
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales, dequantize_kv, quantize_kv
from inferneo.attention.torch_ref import TorchReferenceBackend


@dataclass(frozen=True)
class AttentionCase:
    """One step: decode requests of ``decode_lens`` (including the new token), then ``prefills`` spans."""

    name: str
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    block_size: int = 16
    decode_lens: tuple[int, ...] = ()
    prefills: tuple[tuple[int, int], ...] = field(default_factory=tuple)  # (context_len, num_tokens)


@dataclass
class Step:
    """Inputs of one ``forward`` call; ``metadata()`` makes a fresh metadata object each call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ref_cache: torch.Tensor  # [2, Hkv, blocks, block_size, D], the reference layout
    metadata: Callable[[], AttentionMetadata]
    scale: float


def build_step(case: AttentionCase, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Step:
    """Random q/k/v and cache for ``case`` with requests on shuffled blocks (one spare block at the end)."""
    gen = torch.Generator().manual_seed(seed)
    bs = case.block_size
    totals = list(case.decode_lens) + [c + n for c, n in case.prefills]
    need = [-(-t // bs) for t in totals]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, used = [], [], 0
    for count in need:
        tables.append(perm[used : used + count])
        used += count
    spans = []
    for i, total in enumerate(totals):
        new = 1 if i < len(case.decode_lens) else case.prefills[i - len(case.decode_lens)][1]
        for pos in range(total - new, total):
            slots.append(tables[i][pos // bs] * bs + pos % bs)
        if i >= len(case.decode_lens):
            spans.append((total - new, new, tables[i]))
    num_tokens = len(slots)
    shape_q = (num_tokens, case.num_heads, case.head_dim)
    shape_kv = (num_tokens, case.num_kv_heads, case.head_dim)
    q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in (shape_q, shape_kv, shape_kv))
    ref_cache = torch.randn(2, case.num_kv_heads, num_blocks, bs, case.head_dim, generator=gen).to(dtype)
    nd = len(case.decode_lens)
    width = max((len(t) for t in tables[:nd]), default=0)
    dec_tables = torch.zeros(nd, width, dtype=torch.int64)
    for i, t in enumerate(tables[:nd]):
        dec_tables[i, : len(t)] = torch.tensor(t)
    dev = torch.device(device)
    dec_tables = dec_tables.to(dev)
    dec_lens = torch.tensor(case.decode_lens, dtype=torch.int64, device=dev)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
    span_tables = [torch.tensor(t, dtype=torch.int64, device=dev) for _, _, t in spans]

    def metadata() -> AttentionMetadata:
        prefills, start = [], nd
        for (ctx, new, _), table in zip(spans, span_tables, strict=True):
            prefills.append(PrefillSpan(start, new, ctx, table))
            start += new
        return AttentionMetadata(
            block_size=bs, num_decode_tokens=nd, slot_mapping=slot_mapping,
            decode_block_tables=dec_tables if nd else None, decode_seq_lens=dec_lens if nd else None,
            prefills=prefills,
        )

    return Step(q.to(dev), k.to(dev), v.to(dev), ref_cache.to(dev), metadata, case.head_dim**-0.5)


def _same_layout_as_reference(backend: AttentionBackend, block_size: int, head_dim: int) -> bool:
    probe = backend.kv_cache_shape(7, block_size, 5, head_dim)  # distinct sizes tell the axes apart
    return tuple(probe) == (2, 5, 7, block_size, head_dim)


def _is_native_cpu_layout(backend: AttentionBackend, block_size: int, head_dim: int) -> bool:
    """The native CPU layout: ``[2, Hkv, blocks, block_size * D]`` with key blocks dimension-major."""
    return tuple(backend.kv_cache_shape(7, block_size, 5, head_dim)) == (2, 5, 7, block_size * head_dim)


def to_backend_layout(ref_cache: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
    """A copy of the reference-layout cache in ``backend``'s layout (the reference's, the native CPU one or
    [2, blocks, Hkv, bs, D])."""
    two, kv_heads, num_blocks, block_size, head_dim = ref_cache.shape
    if _same_layout_as_reference(backend, block_size, head_dim):
        return ref_cache.clone()
    if _is_native_cpu_layout(backend, block_size, head_dim):
        keys = ref_cache[0].transpose(2, 3).reshape(kv_heads, num_blocks, block_size * head_dim)
        values = ref_cache[1].reshape(kv_heads, num_blocks, block_size * head_dim)
        return torch.stack([keys, values]).contiguous()
    return ref_cache.permute(0, 2, 1, 3, 4).contiguous()


def to_reference_layout(cache: torch.Tensor, backend: AttentionBackend, head_dim: int) -> torch.Tensor:
    """Inverse of ``to_backend_layout`` (a view, or a copy for the native CPU layout)."""
    if cache.dim() == 4:  # the native CPU layout
        two, kv_heads, num_blocks, block_elems = cache.shape
        block_size = block_elems // head_dim
        keys = cache[0].view(kv_heads, num_blocks, head_dim, block_size).transpose(2, 3)
        return torch.stack([keys, cache[1].view(kv_heads, num_blocks, block_size, head_dim)])
    if _same_layout_as_reference(backend, cache.shape[3], cache.shape[4]):
        return cache
    return cache.permute(0, 2, 1, 3, 4)


def compare_backends(backend: AttentionBackend, step: Step, poison: bool = False, **options):
    """``(out, ref_out, cache, ref_cache)`` after one forward of ``backend`` and of the reference on ``step``.

    ``poison`` fills the backend's output buffer pool with NaNs first (CUDA only) so unwritten rows show up.
    ``options``: the per-layer keywords of ``forward`` (``sliding_window``, ``logit_softcap``, ``sinks``), given
    to both.
    """
    reference = TorchReferenceBackend()
    ref_cache = step.ref_cache.clone()
    meta = step.metadata()
    reference.prepare(meta)
    ref_out = reference.forward(step.q, step.k, step.v, ref_cache, meta, step.scale, **options)
    cache = to_backend_layout(step.ref_cache, backend)
    if poison and step.q.is_cuda:
        junk = torch.full((step.q.numel() * 4,), float("nan"), dtype=step.q.dtype, device=step.q.device)
        del junk  # freed blocks return to the caching allocator holding NaNs
    meta = step.metadata()
    backend.prepare(meta)
    out = backend.forward(step.q, step.k, step.v, cache, meta, step.scale, **options)
    return out, ref_out, to_reference_layout(cache, backend, step.q.shape[2]), ref_cache


def fp8_case_scales(num_kv_heads: int, device: torch.device | str, seed: int = 0) -> KVCacheScales:
    """Distinct per-head key and value scales in [0.25, 1) (random cache values then use most of e4m3's range,
    some of them saturating at 448 * scale), for FP8 checks."""
    gen = torch.Generator().manual_seed(seed + 1)
    k, v = (0.25 + 0.75 * torch.rand(num_kv_heads, generator=gen) for _ in range(2))
    return KVCacheScales(k.to(device), v.to(device))


def compare_fp8_backend(backend: AttentionBackend, step: Step, kv_scales: KVCacheScales, **options):
    """``(out, ref_out, cache, ref_cache)`` for ``backend`` on an FP8 cache against the reference attention on
    the de-quantized keys and values.

    The step's cache is quantized with ``kv_scales``; ``backend`` runs on it (in its layout) with the step's
    q/k/v. The oracle is the reference backend on plain ``q.dtype`` tensors: the de-quantized cache and the new
    keys/values quantized and de-quantized (``fp8_kv``). ``cache`` (the backend's, in the reference layout) and
    ``ref_cache`` are both FP8; ``ref_cache`` is the step's quantized cache with the new tokens' quantized keys
    and values written into their slots.
    """
    dtype = step.q.dtype
    stored = torch.stack([quantize_kv(step.ref_cache[0], kv_scales.k, 0), quantize_kv(step.ref_cache[1], kv_scales.v, 0)])
    plain = torch.stack([dequantize_kv(stored[0], kv_scales.k, dtype, 0), dequantize_kv(stored[1], kv_scales.v, dtype, 0)])
    k = dequantize_kv(quantize_kv(step.k, kv_scales.k), kv_scales.k, dtype)
    v = dequantize_kv(quantize_kv(step.v, kv_scales.v), kv_scales.v, dtype)
    reference = TorchReferenceBackend()
    meta = step.metadata()
    reference.prepare(meta)
    ref_out = reference.forward(step.q, k, v, plain, meta, step.scale, **options)
    # The expected cache: the new tokens' quantized keys and values in their slots, written here by indexing.
    num_kv_heads, head_dim = step.k.shape[1], step.k.shape[2]
    ref_cache = stored.view(torch.uint8).clone()
    slots = ref_cache.view(2, num_kv_heads, -1, head_dim)
    slots[0][:, meta.slot_mapping] = quantize_kv(step.k, kv_scales.k).view(torch.uint8).transpose(0, 1)
    slots[1][:, meta.slot_mapping] = quantize_kv(step.v, kv_scales.v).view(torch.uint8).transpose(0, 1)
    ref_cache = ref_cache.view(FP8_KV_DTYPE)
    cache = to_backend_layout(stored.view(torch.uint8), backend).view(FP8_KV_DTYPE)
    meta = step.metadata()
    backend.prepare(meta)
    out = backend.forward(step.q, step.k, step.v, cache, meta, step.scale, kv_scales=kv_scales, **options)
    cache = to_reference_layout(cache.view(torch.uint8), backend, step.q.shape[2]).view(FP8_KV_DTYPE)
    return out, ref_out, cache, ref_cache


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if ``out`` has any)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# Per-layer attention options to check a backend with: ``sinks=True`` stands for a sink tensor that
# ``variant_options`` builds for the case's head count.
VARIANT_OPTIONS = {
    "window": dict(sliding_window=20),
    "window-1": dict(sliding_window=1),
    "softcap": dict(logit_softcap=1.5),
    "sinks": dict(sinks=True),
    "window-softcap-sinks": dict(sliding_window=7, logit_softcap=2.0, sinks=True),
}


def variant_options(name: str, num_heads: int) -> dict:
    """The ``forward`` keywords of ``VARIANT_OPTIONS[name]``, with sink logits spread over [-1, 3] if asked for."""
    options = dict(VARIANT_OPTIONS[name])
    if options.pop("sinks", False):
        options["sinks"] = torch.linspace(-1.0, 3.0, num_heads)
    return options


STANDARD_CASES = (
    AttentionCase("decode-mha", 4, 4, 64, 16, decode_lens=(1, 15, 16, 17, 33, 64)),
    AttentionCase("decode-gqa3-d128-bs32", 6, 2, 128, 32, decode_lens=(1, 31, 32, 33, 70)),
    AttentionCase("decode-gqa4", 8, 2, 64, 16, decode_lens=(5, 48, 49, 100)),
    AttentionCase("prefill-no-context", 4, 2, 64, 16, prefills=((0, 37), (0, 16), (0, 5))),
    AttentionCase("prefill-with-context", 6, 2, 64, 16, prefills=((16, 20), (7, 40), (45, 3))),
    AttentionCase("prefill-d128-bs32", 4, 4, 128, 32, prefills=((33, 30),)),
    AttentionCase("mixed", 8, 2, 64, 16, decode_lens=(1, 17, 40), prefills=((0, 19), (23, 9))),
)
