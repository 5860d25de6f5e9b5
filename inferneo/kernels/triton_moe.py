"""Fused mixture-of-experts on the GPU in Triton: (token, expert) pairs sorted by expert, two grouped GEMMs.

1. **Align** (:func:`align_pairs_by_expert`): the ``T * k`` (token, slot) pairs are grouped by expert and each
   expert's group is padded to a multiple of the tile height ``block_m``, giving ``sorted_pairs`` (pair indices, the
   padding slots holding ``T * k``) and ``block_experts`` (the expert of each ``block_m`` block, -1 past the end).
   Everything stays on the device with sizes known from the shapes (the number of blocks is bounded by
   ``ceil(T*k / block_m) + min(E, T*k)``), so a decode step stays capturable in a CUDA graph: few pairs go through
   one single-program Triton kernel, many through a handful of PyTorch ops (a stable sort).
2. **Gate/up GEMM** (``_gate_up_kernel``): every block multiplies its tokens' rows of ``x`` by its expert's gate and
   up rows of ``w13``, adds the biases and applies the activation (``silu`` or gpt-oss's ``swigluoai``) in float32,
   writing ``[T*k, I]`` rows indexed by pair.
3. **Down GEMM** (``_down_kernel``): those rows times the expert's ``w2``, plus its bias, scaled by the pair's top-k
   weight in the epilogue, written as ``[T*k, H]``; the ``k`` rows of each token are then summed.

A decode step of a few tokens skips all that: each (token, slot) pair reads its expert's rows directly in a
matrix-vector kernel, and the down kernel reads all ``k`` experts of a token together and sums them itself
(:data:`PAIR_PATH_MAX_TOKENS`); both launch with programmatic dependent launch on Hopper, the down kernel reading its
first weight tile before the gate/up kernel has finished.

Tile sizes come from ``moe_tile_configs`` (tuned JSON files per shape, a default otherwise). Tests run the kernels
on CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against a per-expert PyTorch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels.moe_tile_configs import MoeTileConfig, PairTiles, moe_tile_config
from inferneo.kernels.moe_tile_configs import pair_tiles as moe_pair_tiles

SINGLE_PROGRAM_ALIGN_MAX_PAIRS = 2048
"""Up to this many (token, slot) pairs the align step is one Triton program; more go through PyTorch ops."""

_ACTIVATION_IDS = {"silu": 0, "swigluoai": 1}


@dataclass(frozen=True, slots=True)
class ExpertBlocks:
    """The (token, slot) pairs grouped by expert in ``block_m``-row blocks.

    ``sorted_pairs`` ``[num_blocks * block_m]`` int32: pair index ``t * k + slot`` per row, ``num_pairs`` in the
    padding rows; ``block_experts`` ``[num_blocks]`` int32: each block's expert, -1 for the unused blocks at the end.
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def num_blocks(self) -> int:
        return self.block_experts.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the blocks the pairs fill: each expert that gets pairs wastes at most one partial block."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


@triton.jit
def _align_kernel(ids_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs, num_experts, num_slots, num_blocks,
                  E_POW2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    # Pass 1: pairs per expert, padded to whole blocks; each expert's first slot.
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        ids = tl.load(ids_ptr + start + lanes, mask=start + lanes < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    # Every slot starts as padding; each block's expert is the one whose slot range holds its first row.
    for start in range(0, num_slots, CHUNK):
        tl.store(sorted_pairs_ptr + start + lanes, num_pairs, mask=start + lanes < num_slots)
    for start in range(0, num_blocks, CHUNK):
        first_row = (start + lanes) * BLOCK_M
        expert = tl.sum((padded_end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < num_experts, expert, -1)
        tl.store(block_experts_ptr + start + lanes, expert, mask=start + lanes < num_blocks)
    tl.debug_barrier()  # the padding stores land before the pair stores below overwrite some of them
    # Pass 2: each pair's slot is its expert's first slot plus the pairs of that expert before it.
    placed = padded_start
    for start in range(0, num_pairs, CHUNK):
        pair = start + lanes
        ids = tl.load(ids_ptr + pair, mask=pair < num_pairs, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        earlier_same = tl.cumsum(onehot, axis=0) - onehot
        slot = tl.sum((earlier_same + placed[None, :]) * onehot, axis=1)
        tl.store(sorted_pairs_ptr + slot, pair, mask=pair < num_pairs)
        placed += tl.sum(onehot, axis=0)


def _align_single_program(flat_ids: torch.Tensor, num_experts: int, block_m: int, blocks: int) -> ExpertBlocks:
    num_pairs = flat_ids.numel()
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=flat_ids.device)
    block_experts = torch.empty(blocks, dtype=torch.int32, device=flat_ids.device)
    e_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pow2))
    _align_kernel[(1,)](flat_ids, sorted_pairs, block_experts, num_pairs, num_experts, sorted_pairs.numel(), blocks,
                        E_POW2=e_pow2, CHUNK=chunk, BLOCK_M=block_m, num_warps=8)
    return ExpertBlocks(sorted_pairs, block_experts, block_m, num_pairs)


def _align_by_sort(flat_ids: torch.Tensor, num_experts: int, block_m: int, blocks: int) -> ExpertBlocks:
    device, num_pairs = flat_ids.device, flat_ids.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat_ids, stable=True)
    by_expert = flat_ids[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    slot = (padded_end - padded)[by_expert] + rank
    sorted_pairs = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, slot, order.to(torch.int32))
    first_rows = torch.arange(blocks, device=device) * block_m
    expert = torch.searchsorted(padded_end, first_rows, right=True)
    block_experts = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    return ExpertBlocks(sorted_pairs, block_experts, block_m, num_pairs)


def align_pairs_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the (token, slot) pairs of ``ids`` ``[T, k]`` by expert in blocks of ``block_m`` rows (see the module
    doc), without synchronising with the host."""
    flat_ids = ids.reshape(-1)
    blocks = max_blocks(flat_ids.numel(), num_experts, block_m)
    if flat_ids.numel() <= SINGLE_PROGRAM_ALIGN_MAX_PAIRS:
        return _align_single_program(flat_ids.contiguous(), num_experts, block_m, blocks)
    return _align_by_sort(flat_ids.to(torch.int64), num_experts, block_m, blocks)


@triton.jit
def _activation(gate, up, ACTIVATION: tl.constexpr):
    """The gated activation in float32: 0 ``silu(gate) * up``; 1 swigluoai (gate clamped above at 7, up to
    [-7, 7], then ``(up + 1) * gate * sigmoid(1.702 * gate)``)."""
    if ACTIVATION == 0:
        return gate / (1.0 + tl.exp(-gate)) * up
    gate = tl.minimum(gate, 7.0)
    up = tl.minimum(tl.maximum(up, -7.0), 7.0)
    return (up + 1.0) * gate / (1.0 + tl.exp(-1.702 * gate))


@triton.jit
def _block_tile(sorted_pairs_ptr, num_pairs, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows (pair indices, int64, and which are real) and output columns (and which are in range)."""
    pair = tl.load(sorted_pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pair.to(tl.int64), pair < num_pairs, cols, cols < N


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs, top_k, N, K,
                    stride_xt, stride_we, stride_wn, stride_be, stride_op,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.load(block_experts_ptr + tl.program_id(0)).to(tl.int64)
    if expert < 0:
        return
    pair, row_ok, cols, col_ok = _block_tile(sorted_pairs_ptr, num_pairs, N, BLOCK_M, BLOCK_N)
    token = pair // top_k
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + token[:, None] * stride_xt + ks[None, :]
    gate_tile = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    up_tile = gate_tile + N * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_tile + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_gate = tl.dot(a, tl.load(gate_tile + k0, mask=w_mask, other=0.0), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, tl.load(up_tile + k0, mask=w_mask, other=0.0), acc_up, input_precision=PRECISION)
    if HAS_BIAS:
        acc_gate += tl.load(bias_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(bias_ptr + expert * stride_be + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = _activation(acc_gate, acc_up, ACTIVATION)
    out = out_ptr + pair[:, None] * stride_op + cols[None, :]
    tl.store(out, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, bias_ptr, topk_weights_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs,
                 N, K, stride_hp, stride_we, stride_wn, stride_be, stride_op,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.load(block_experts_ptr + tl.program_id(0)).to(tl.int64)
    if expert < 0:
        return
    pair, row_ok, cols, col_ok = _block_tile(sorted_pairs_ptr, num_pairs, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    h_tile = h_ptr + pair[:, None] * stride_hp + ks[None, :]
    w_tile = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(h_tile + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_tile + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(topk_weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pair[:, None] * stride_op + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---- few tokens: no align step, matrix-vector products per (token, slot) pair --------------------------------------

PAIR_PATH_MAX_TOKENS = 4
"""Up to this many tokens (a small decode step) each pair reads its expert's rows directly: two kernels, no align,
the top-k sum fused into the down projection. Tokens that share an expert read it once each (fine while few).
H200, Qwen3-30B-A3B layer (2026-12-03, kernel-alone do_bench): 42 / 62 / 103 / 144 us at 1 / 2 / 4 / 8 tokens against
125 / 85 / 200 / 144 us for the sorted grouped GEMMs (floor 18 / 33 / 62 / 117 us). Since the down kernel reads a
token's k experts at once, with tuned tiles and PDL (``moe_decode_sweep.py``, calls in a CUDA graph): 21.9 / 40.9 /
73.1 us at 1 / 2 / 4 tokens (floor 17.8 / 34.7 / 64.6 us)."""


@triton.jit
def _gate_up_chunk(acc_gate, acc_up, x_row, gate_rows, up_rows, ks, k0, col_ok, K: tl.constexpr,
                   REDUCE_EACH: tl.constexpr, EVICT: tl.constexpr):
    """One ``BLOCK_K`` chunk of the gate and up rows times ``x``: added to ``[BLOCK_N, BLOCK_K]`` float32
    accumulators, or with ``REDUCE_EACH`` summed over the chunk into ``[BLOCK_N]`` ones (fewer registers)."""
    k_ok = ks < K - k0
    x = tl.load(x_row + k0, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    w_mask = col_ok[:, None] & k_ok[None, :]
    gate = tl.load(gate_rows + k0, mask=w_mask, other=0.0, eviction_policy=EVICT).to(tl.float32) * x
    up = tl.load(up_rows + k0, mask=w_mask, other=0.0, eviction_policy=EVICT).to(tl.float32) * x
    if REDUCE_EACH:
        acc_gate += tl.sum(gate, axis=1)
        acc_up += tl.sum(up, axis=1)
    else:
        acc_gate += gate
        acc_up += up
    return acc_gate, acc_up


@triton.jit
def _pair_gate_up_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ids_ptr, top_k, N, stride_xt, stride_we, stride_wn,
                         stride_be, stride_op, K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, UNROLL: tl.constexpr,
                         REDUCE_EACH: tl.constexpr, EVICT: tl.constexpr):
    # the routing that writes ids (and x) comes right before; the late launch: the down kernel after this one reads
    # the routing's ids before it waits
    wait_for_previous_kernel(PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // top_k) * stride_xt + ks
    gate_rows = w_ptr + expert * stride_we + cols[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    up_rows = gate_rows + N * stride_wn
    if REDUCE_EACH:
        acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if UNROLL:  # K is a constant: all chunks unrolled, their loads free to issue together
        for k0 in tl.static_range(0, K, BLOCK_K):
            acc_gate, acc_up = _gate_up_chunk(acc_gate, acc_up, x_row, gate_rows, up_rows, ks, k0, col_ok, K,
                                              REDUCE_EACH, EVICT)
    else:
        for k0 in range(0, K, BLOCK_K):
            acc_gate, acc_up = _gate_up_chunk(acc_gate, acc_up, x_row, gate_rows, up_rows, ks, k0, col_ok, K,
                                              REDUCE_EACH, EVICT)
    if REDUCE_EACH:
        gate, up = acc_gate, acc_up
    else:
        gate = tl.sum(acc_gate, axis=1)
        up = tl.sum(acc_up, axis=1)
    if HAS_BIAS:
        gate += tl.load(bias_ptr + expert * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
        up += tl.load(bias_ptr + expert * stride_be + N + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = _activation(gate, up, ACTIVATION)
    tl.store(out_ptr + pair * stride_op + cols, h.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _pair_down_sum_kernel(h_ptr, w_ptr, bias_ptr, topk_weights_ptr, out_ptr, ids_ptr, top_k, N, stride_hp,
                          stride_we, stride_wn, stride_be, stride_ot, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          TOPK_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                          UNROLL: tl.constexpr, EVICT: tl.constexpr, REDUCE_EACH: tl.constexpr = False):
    # One program: one token, BLOCK_N output features, all its top_k experts at once as a [TOPK_POW2, BLOCK_N,
    # BLOCK_K] tile (so a 1-token step has N / BLOCK_N programs each streaming k experts' rows together).
    # REDUCE_EACH: each K chunk is summed at once into [TOPK_POW2, BLOCK_N] float32 sums (fewer registers than the
    # [TOPK_POW2, BLOCK_N, BLOCK_K] accumulator summed at the end; another summation order).
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, TOPK_POW2)
    slot_ok = slots < top_k
    pairs = token * top_k + slots
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    # ids and top-k weights come from the routing, which finished before the gate/up kernel let this one launch:
    # the first weight tile is read before waiting for the gate/up kernel's output.
    experts = tl.load(ids_ptr + pairs, mask=slot_ok, other=0).to(tl.int64)
    rows = w_ptr + experts[:, None, None] * stride_we + cols[None, :, None] * stride_wn + ks[None, None, :]
    row_ok = slot_ok[:, None, None] & col_ok[None, :, None]
    h_rows = h_ptr + pairs[:, None] * stride_hp + ks[None, :]
    k_ok = ks < K
    w = tl.load(rows, mask=row_ok & k_ok[None, None, :], other=0.0, eviction_policy=EVICT)
    wait_for_previous_kernel(PDL, EARLY=True)  # the next layer's q/k/v GEMV may launch and stream its weights
    h = tl.load(h_rows, mask=slot_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * h[:, None, :]
    if REDUCE_EACH:
        acc = tl.sum(acc, axis=2)
    if UNROLL:
        for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
            acc += _down_chunk(h_rows, rows, ks, k0, slot_ok, row_ok, K, EVICT, REDUCE_EACH)
    else:
        for k0 in range(BLOCK_K, K, BLOCK_K):
            acc += _down_chunk(h_rows, rows, ks, k0, slot_ok, row_ok, K, EVICT, REDUCE_EACH)
    y = acc if REDUCE_EACH else tl.sum(acc, axis=2)  # [TOPK_POW2, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + experts[:, None] * stride_be + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
    scale = tl.load(topk_weights_ptr + pairs, mask=slot_ok, other=0.0).to(tl.float32)
    total = tl.sum(y * scale[:, None], axis=0)  # a fixed reduction order: the same sum on every run
    tl.store(out_ptr + token * stride_ot + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _down_chunk(h_rows, rows, ks, k0, slot_ok, row_ok, K: tl.constexpr, EVICT: tl.constexpr,
                REDUCE: tl.constexpr = False):
    # one K chunk's products, [TOPK_POW2, BLOCK_N, BLOCK_K], or (REDUCE) their sums over the chunk
    k_ok = ks < K - k0
    h = tl.load(h_rows + k0, mask=slot_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    w = tl.load(rows + k0, mask=row_ok & k_ok[None, None, :], other=0.0, eviction_policy=EVICT)
    products = w.to(tl.float32) * h[:, None, :]
    if REDUCE:
        return tl.sum(products, axis=2)
    return products


def _evict(code: int) -> str:
    return ("", "evict_first", "evict_last")[code]


def pair_gate_up(x: torch.Tensor, w13: torch.Tensor, ids: torch.Tensor, activation: str,
                 w13_bias: torch.Tensor | None, tiles: PairTiles, pdl: bool) -> torch.Tensor:
    """The few-token gate/up projection and activation: ``[T * k, I]`` rows, one per (token, slot) pair, for
    contiguous ``x`` ``[T, H]``, ``w13`` ``[E, 2I, H]`` and ``ids`` ``[T, k]``."""
    num_tokens, top_k = ids.shape
    inter = w13.shape[1] // 2
    hidden_act = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _pair_gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, tiles.up_block_n))](
        x, w13, w13_bias if w13_bias is not None else w13, hidden_act, ids, top_k, inter, x.stride(0),
        w13.stride(0), w13.stride(1), w13_bias.stride(0) if w13_bias is not None else 0, hidden_act.stride(0),
        K=x.shape[1], HAS_BIAS=w13_bias is not None, ACTIVATION=_ACTIVATION_IDS[activation],
        BLOCK_N=tiles.up_block_n, BLOCK_K=tiles.up_block_k, PDL=pdl, UNROLL=bool(tiles.up_unroll),
        REDUCE_EACH=bool(tiles.up_reduce_each), EVICT=_evict(tiles.evict), num_warps=tiles.up_num_warps,
        **launch_options(pdl))
    return hidden_act


def pair_down_sum(hidden_act: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  w2_bias: torch.Tensor | None, tiles: PairTiles, pdl: bool) -> torch.Tensor:
    """The few-token down projection with the top-k sum: ``[T, H]`` from :func:`pair_gate_up`'s rows, ``w2``
    ``[E, H, I]`` and the routing's contiguous ``weights`` / ``ids`` ``[T, k]``. Each output is the k weighted
    experts summed in float32 in a fixed order (deterministic: no atomics)."""
    num_tokens, top_k = ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    out = torch.empty(num_tokens, hidden, dtype=hidden_act.dtype, device=hidden_act.device)
    _pair_down_sum_kernel[(num_tokens, triton.cdiv(hidden, tiles.down_block_n))](
        hidden_act, w2, w2_bias if w2_bias is not None else w2, weights, out, ids, top_k, hidden,
        hidden_act.stride(0), w2.stride(0), w2.stride(1), w2_bias.stride(0) if w2_bias is not None else 0,
        out.stride(0), K=inter, HAS_BIAS=w2_bias is not None, TOPK_POW2=triton.next_power_of_2(top_k),
        BLOCK_N=tiles.down_block_n, BLOCK_K=tiles.down_block_k, PDL=pdl, UNROLL=bool(tiles.down_unroll),
        REDUCE_EACH=bool(tiles.down_reduce_each), EVICT=_evict(tiles.evict), num_warps=tiles.down_num_warps,
        **launch_options(pdl))
    return out


def _pair_fused_experts(x, w13, w2, weights, ids, activation, w13_bias, w2_bias, tiles: PairTiles, pdl: bool):
    ids, weights = ids.contiguous(), weights.contiguous()  # before the launches: no copy kernel between the two
    hidden_act = pair_gate_up(x, w13, ids, activation, w13_bias, tiles, pdl)
    return pair_down_sum(hidden_act, w2, weights, ids, w2_bias, tiles, pdl)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only matters for float32 inputs


def triton_fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                         ids: torch.Tensor, *, activation: str = "silu", w13_bias: torch.Tensor | None = None,
                         w2_bias: torch.Tensor | None = None, config: MoeTileConfig | None = None,
                         pair_tiles: PairTiles | None = None, pdl: bool | None = None) -> torch.Tensor:
    """:func:`~inferneo.model_executor.layers.moe.fused_experts` through the Triton kernels (same arguments and
    result). Up to :data:`PAIR_PATH_MAX_TOKENS` tokens take the per-pair path (``pair_tiles``, else the shape's tuned
    ones), more the sorted grouped GEMMs; ``config`` overrides the tuned tile config for this shape (and forces the
    grouped GEMMs). ``pdl``: launch the per-pair kernels with programmatic dependent launch (None: decided from
    ``x``, see ``_pdl.pdl_for``)."""
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"unknown mixture-of-experts activation {activation!r}; supported: {list(_ACTIVATION_IDS)}")
    num_tokens, top_k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if num_tokens == 0:
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    if config is None and num_tokens <= PAIR_PATH_MAX_TOKENS:
        tiles = pair_tiles or moe_pair_tiles(num_experts, inter, hidden, x.dtype)
        return _pair_fused_experts(x, w13, w2, weights, ids, activation, w13_bias, w2_bias, tiles, pdl_for(x, pdl))
    config = config or moe_tile_config(num_experts, inter, hidden, x.dtype, num_tokens, top_k)
    blocks = align_pairs_by_expert(ids, num_experts, config.block_m)
    num_pairs = num_tokens * top_k
    precision = _dot_precision(x.dtype)
    hidden_act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    up = config.up
    _gate_up_kernel[(blocks.num_blocks, triton.cdiv(inter, up.block_n))](
        x, w13, w13_bias if w13_bias is not None else w13, hidden_act, blocks.sorted_pairs, blocks.block_experts,
        num_pairs, top_k, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        w13_bias.stride(0) if w13_bias is not None else 0, hidden_act.stride(0),
        HAS_BIAS=w13_bias is not None, ACTIVATION=_ACTIVATION_IDS[activation], PRECISION=precision,
        BLOCK_M=config.block_m, BLOCK_N=up.block_n, BLOCK_K=up.block_k, num_warps=up.num_warps,
        num_stages=up.num_stages)
    per_pair = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    down = config.down
    _down_kernel[(blocks.num_blocks, triton.cdiv(hidden, down.block_n))](
        hidden_act, w2, w2_bias if w2_bias is not None else w2, weights.reshape(-1).contiguous(), per_pair,
        blocks.sorted_pairs, blocks.block_experts, num_pairs, hidden, inter, hidden_act.stride(0), w2.stride(0),
        w2.stride(1), w2_bias.stride(0) if w2_bias is not None else 0, per_pair.stride(0),
        HAS_BIAS=w2_bias is not None, PRECISION=precision, BLOCK_M=config.block_m, BLOCK_N=down.block_n,
        BLOCK_K=down.block_k, num_warps=down.num_warps, num_stages=down.num_stages)
    if top_k == 1:
        return per_pair
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)
