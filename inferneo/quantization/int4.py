"""4-bit weight-only quantization (W4A16): AWQ, GPTQ and compressed-tensors ``pack-quantized`` checkpoints.

Activations stay in the model dtype; each weight is ``(q - z) * s`` with a 4-bit code ``q``, and a scale ``s`` and
zero point ``z`` shared by a group of ``group_size`` input columns of one output row (layouts:
:mod:`inferneo.quantization.int4_layouts`). The layer keeps the checkpoint's tensors under their own names while
loading; :meth:`Int4LinearMethod.finalize` repacks them once into the canonical layout and frees them. The product
runs in the native CPU kernel (``inferneo/csrc/int4_kernels.cpp``), the Triton W4A16 kernel on CUDA (or PyTorch's
int4 kernel, tinygemm, for the shapes where the launch table measured it faster: :mod:`inferneo.kernels.tinygemm_int4`),
or, where none applies, de-quantization followed by ``F.linear`` (the reference).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from inferneo import envs
from inferneo.kernel_config import KernelConfig
from inferneo.kernels.scaled_row import ScaledRow
from inferneo.quantization.base import (
    LinearMethod,
    LinearShape,
    QuantConfig,
    QuantizedLinear,
    WeightLoader,
    new_parameter,
    row_shard_loader,
)
from inferneo.quantization.int4_layouts import (
    CHECKPOINT_TENSORS,
    Int4Codes,
    Int4RowWeights,
    Int4Weights,
    dequantize,
    dequantize_checkpoint_tensors,
    dequantize_rows,
    pack_canonical,
    unpack_awq,
    unpack_compressed,
    unpack_gptq,
)
from inferneo.quantization.layer_names import checkpoint_module_names, contains_pattern, layer_listed
from inferneo.quantization.parallel import Axis

logger = logging.getLogger(__name__)

Int4Layout = Literal["awq", "gptq", "compressed-tensors"]
_LAYOUTS = ("awq", "gptq", "compressed-tensors")
# Devices and model dtypes the 4-bit formats run in.
_SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.bfloat16),
                     "cuda": (torch.float16, torch.bfloat16, torch.float32)}


@dataclass(frozen=True, slots=True)
class Int4Scheme:
    """How a checkpoint stores its 4-bit weights.

    ``layout`` names the checkpoint's tensors and packing order; ``group_size`` is the number of input columns
    sharing one scale and zero point (-1: the whole input dimension); ``zero_point`` False means symmetric weights
    (every zero point 8, no zero-point tensor); ``desc_act`` (GPTQ ``desc_act``, compressed-tensors
    ``actorder: group``) means the checkpoint's ``g_idx`` (``weight_g_idx``) may scatter a group's columns.
    """

    layout: Int4Layout
    group_size: int
    zero_point: bool
    desc_act: bool = False

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ValueError(f"int4 layout {self.layout!r} is unknown; supported: {', '.join(_LAYOUTS)}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"{self.layout}: group_size {self.group_size} is not supported; supported: -1 or a "
                             f"positive multiple of 8")
        if self.desc_act and self.layout == "awq":
            raise ValueError("awq: desc_act (act-order) is not an AWQ option; supported: gptq, compressed-tensors")

    def expected_tensors(self) -> frozenset[str]:
        """The checkpoint tensors (leaf names) every weight of this scheme stores."""
        if self.layout == "awq":
            return frozenset({"qweight", "scales", *(("qzeros",) if self.zero_point else ())})
        if self.layout == "gptq":
            return frozenset({"qweight", "qzeros", "scales", "g_idx"})
        return frozenset({"weight_packed", "weight_scale", "weight_shape",
                          *(("weight_zero_point",) if self.zero_point else ()),
                          *(("weight_g_idx",) if self.desc_act else ())})

    def group_for(self, in_features: int, prefix: str) -> int:
        """The group size of a layer with ``in_features`` inputs (ValueError when it does not divide them)."""
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group or in_features % 8:
            raise ValueError(f"{self.layout}: {prefix} has {in_features} input features, which group_size "
                             f"{self.group_size} does not divide (or not a multiple of 8)")
        return group


# ---- the layer -----------------------------------------------------------------------------------------------


def _per_shard_vector_loader(shape: LinearShape, first_group: int = 0, groups: int | None = None) -> WeightLoader:
    """A loader for GPTQ's ``g_idx`` held once per logical shard (``[shards, in]``): shard ``i`` fills row ``i``;
    a fused checkpoint tensor (``shard=None``) fills every row. A tensor-parallel rank holding some input columns
    of a row-parallel layer gets their groups counted from its ``first_group`` of ``groups``; ValueError when a
    column belongs to another rank's group (act-order scatters a group's columns over the whole row)."""

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        if tuple(tensor.shape) != (shape.in_features,):
            raise ValueError(f"{shape.prefix}: g_idx has shape {tuple(tensor.shape)}, the layer expects "
                             f"({shape.in_features},)")
        if first_group or groups is not None:
            tensor = tensor - first_group
            if groups is not None and tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= groups):
                raise ValueError(f"{shape.prefix}: act-order (desc_act) scatters each quantization group's "
                                 "input columns over the whole layer, and with tensor parallelism each rank holds "
                                 "one contiguous part of them; serve this checkpoint with tensor_parallel_size 1, "
                                 "or one quantized without act-order")
        target = param.data if shard is None else param.data[shard]
        target.copy_(tensor.expand_as(target))

    return load


class Int4LinearMethod(LinearMethod):
    """A linear layer with 4-bit weights in one of the :class:`Int4Scheme` layouts.

    After :meth:`finalize` the layer holds its weight once, in the canonical layout (the row layout where the
    Triton kernels run it, on CUDA), as buffers ``int4_packed``,
    ``int4_scales``, ``int4_zeros`` (and ``int4_perm`` for act-order GPTQ), or in tinygemm's layout
    (``int4_packed``, ``int4_scales_and_zeros``) where the launch table chose it for the shape; a fused GPTQ layer whose shards have
    different ``g_idx`` orders keeps one such set per shard (suffix ``_<shard>``) and multiplies them in turn.
    """

    def __init__(self, scheme: Int4Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.layout

    # ---- checkpoint tensors ----

    def create_weights(self, layer: QuantizedLinear) -> None:
        shape = layer.shape
        group = self.scheme.group_for(shape.in_features, shape.prefix)
        for size in shape.output_sizes:
            if size % 8:
                raise ValueError(f"{self.name}: {shape.prefix} has a shard of {size} output rows; 4-bit layouts "
                                 f"need multiples of 8")
        n_in, n_out, groups = shape.in_features, shape.out_features, shape.in_features // group
        layer.int4_group_size = group
        out_rows = row_shard_loader(shape, dim=0)
        # Input columns (tensor parallelism cuts a row-parallel layer's): a group of them shares one scale and zero
        # point; one group per row (group_size -1) is one scale for every rank's columns.
        by_group = (lambda dim: None) if self.scheme.group_size == -1 else (lambda dim: Axis(dim, 1, group))
        if self.scheme.layout == "awq":
            packed_cols = row_shard_loader(shape, dim=1, per_row=(1, 8))
            new_parameter(layer, "qweight", (n_in, n_out // 8), torch.int32, packed_cols, cols=Axis(0))
            if self.scheme.zero_point:
                new_parameter(layer, "qzeros", (groups, n_out // 8), torch.int32, packed_cols, cols=by_group(0))
            new_parameter(layer, "scales", (groups, n_out), torch.float32, row_shard_loader(shape, dim=1),
                          cols=by_group(0))
        elif self.scheme.layout == "gptq":
            cols = row_shard_loader(shape, dim=1)
            new_parameter(layer, "qweight", (n_in // 8, n_out), torch.int32, cols, cols=Axis(0, 1, 8))
            new_parameter(layer, "qzeros", (groups, n_out // 8), torch.int32,
                          row_shard_loader(shape, dim=1, per_row=(1, 8)), cols=by_group(0))
            new_parameter(layer, "scales", (groups, n_out), torch.float32, cols, cols=by_group(0))
            self._create_g_idx(layer, "g_idx", group)
        else:  # compressed-tensors pack-quantized
            new_parameter(layer, "weight_packed", (n_out, n_in // 8), torch.int32, out_rows, cols=Axis(1, 1, 8))
            new_parameter(layer, "weight_scale", (n_out, groups), torch.float32, out_rows, cols=by_group(1))
            if self.scheme.zero_point:
                new_parameter(layer, "weight_zero_point", (n_out // 8, groups), torch.int32,
                              row_shard_loader(shape, dim=0, per_row=(1, 8)), cols=by_group(1))
            new_parameter(layer, "weight_shape", (2,), torch.int64, _weight_shape_loader(layer))
            if self.scheme.desc_act:
                self._create_g_idx(layer, "weight_g_idx", group)

    def _create_g_idx(self, layer: QuantizedLinear, name: str, group: int) -> None:
        """Each column's group, once per logical shard (act-order orders each shard's columns itself); consecutive
        groups until the checkpoint says otherwise."""
        shape = layer.shape
        first_group = 0
        if layer.parallel is not None and self.scheme.group_size != -1:
            first_group = layer.parallel.input_start // group
        g_idx = new_parameter(layer, name, (len(shape.output_sizes), shape.in_features), torch.int32,
                              _per_shard_vector_loader(shape, first_group, shape.in_features // group),
                              cols=Axis(0))
        g_idx.data.copy_(torch.arange(shape.in_features, dtype=torch.int32, device=layer.device) // group)

    def _g_idx(self, layer: QuantizedLinear) -> torch.Tensor | None:
        """The per-shard ``[shards, in]`` column groups, or None for a layout without them."""
        return getattr(layer, "g_idx" if self.scheme.layout == "gptq" else "weight_g_idx", None)

    def _checkpoint_codes(self, layer: QuantizedLinear, rows: slice) -> Int4Codes:
        """The checkpoint tensors of output rows ``rows`` (a shard, or all) unpacked."""
        group = layer.int4_group_size
        packed_rows = slice(rows.start // 8, rows.stop // 8)
        if self.scheme.layout == "awq":
            qzeros = layer.qzeros[:, packed_rows] if self.scheme.zero_point else None
            return unpack_awq(layer.qweight[:, packed_rows], qzeros, layer.scales[:, rows], group)
        all_g_idx = self._g_idx(layer)
        shard = _shard_of(layer.shape, rows)
        g_idx = None if all_g_idx is None else all_g_idx[0 if shard is None else shard]
        if self.scheme.layout == "gptq":
            return unpack_gptq(layer.qweight[:, rows], layer.qzeros[:, packed_rows], layer.scales[:, rows], group,
                               g_idx)
        zero_point = layer.weight_zero_point[packed_rows] if self.scheme.zero_point else None
        return unpack_compressed(layer.weight_packed[rows], layer.weight_scale[rows], zero_point, group, g_idx)

    def _checkpoint_names(self) -> tuple[str, ...]:
        if self.scheme.layout == "awq":
            return ("qweight", "qzeros", "scales")
        if self.scheme.layout == "gptq":
            return ("qweight", "qzeros", "scales", "g_idx")
        return ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    # ---- canonical layout ----

    def _row_blocks(self, layer: QuantizedLinear) -> list[slice]:
        """Output-row ranges repacked together: the whole layer, or each shard when a GPTQ layer's shards order
        their columns differently (act-order ``g_idx`` per shard)."""
        whole = [slice(0, layer.out_features)]
        g_idx = self._g_idx(layer)
        if g_idx is None or len(layer.shape.output_sizes) == 1:
            return whole
        if all(torch.equal(g_idx[0], g_idx[i]) for i in range(1, g_idx.shape[0])):
            return whole
        offsets = [layer.shape.shard_offset(i) for i in range(len(layer.shape.output_sizes) + 1)]
        return [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    @torch.no_grad()
    def finalize(self, layer: QuantizedLinear, kernels: KernelConfig) -> None:
        """Repack into the canonical layout (one block, or one per shard), free the checkpoint tensors and choose
        the kernel for ``layer.device``."""
        if getattr(layer, "int4_blocks", None) is not None:
            return
        self._check_weight_shape(layer)
        blocks = [pack_canonical(self._checkpoint_codes(layer, rows)) for rows in self._row_blocks(layer)]
        for name in self._checkpoint_names():
            if name in layer._parameters:
                delattr(layer, name)
        layer.int4_kernel = select_int4_kernel(layer.device, layer.dtype, blocks[0].group_size, kernels)
        inner = _tinygemm_inner_k_tiles(layer, blocks)
        if inner is not None:  # PyTorch's int4 kernel measured faster for this shape: its layout only
            from inferneo.kernels.tinygemm_int4 import tinygemm_from, tinygemm_linear

            blocks = [tinygemm_from(blocks[0], inner)]
            layer.int4_kernel = tinygemm_linear
        elif getattr(layer.int4_kernel, "reads_row_layout", False):
            from inferneo.quantization.int4_layouts import pack_rows

            compact = not envs.int4_float32_scales()
            blocks = [pack_rows(b, compact) for b in blocks]  # the GPU kernels' layout; the canonical tensors are freed
        _hold_blocks(layer, blocks)

    def _check_weight_shape(self, layer: QuantizedLinear) -> None:
        if self.scheme.layout != "compressed-tensors":
            return
        got = tuple(int(v) for v in layer.weight_shape.tolist())
        if got != (0, 0) and got != (layer.out_features, layer.in_features):
            raise ValueError(f"{layer.shape.prefix}: weight_shape {list(got)} does not match the layer "
                             f"[{layer.out_features}, {layer.in_features}]")

    # ---- compute ----

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        blocks: list[Int4Weights | Int4RowWeights] = layer.int4_blocks
        rows = x.reshape(-1, layer.in_features)
        outs = [layer.int4_kernel(rows if b.perm is None else rows.index_select(1, b.perm), b) for b in blocks]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        blocks = getattr(layer, "int4_blocks", None)
        if blocks is None:
            from inferneo.quantization.int4_layouts import dequantize_codes

            return torch.cat([dequantize_codes(self._checkpoint_codes(layer, rows))
                              for rows in self._row_blocks(layer)])
        return torch.cat([_dequantize_block(b) for b in blocks])

    def silu_mul_applies(self, layer: QuantizedLinear, x: torch.Tensor) -> bool:
        """Whether :meth:`silu_mul` runs ``x`` through a fused gate/up + SiLU kernel: half precision, the layer
        held as one row-layout block (no act-order permutation), no bias, and a fused launch for ``x``'s rows
        (the one-row GEMV, or the tensor-core kernel where the tuned table or the default picks it)."""
        blocks = getattr(layer, "int4_blocks", None)
        if not (blocks is not None and len(blocks) == 1 and isinstance(blocks[0], Int4RowWeights)
                and blocks[0].perm is None and x.dim() == 2 and x.shape[0] >= 1
                and x.dtype in (torch.float16, torch.bfloat16) and layer.bias is None):
            return False
        from inferneo.kernels.triton_int4 import silu_fused_config

        return silu_fused_config(x, blocks[0]) is not None

    def silu_mul(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of a fused gate/up layer in one kernel when :meth:`silu_mul_applies`, else None (the
        caller projects, then activates)."""
        if not self.silu_mul_applies(layer, x):
            return None
        from inferneo.kernels.triton_int4 import w4a16_silu_mul

        return w4a16_silu_mul(x, layer.int4_blocks[0])

    def _epilogue_block(self, layer: QuantizedLinear, x: torch.Tensor) -> Int4RowWeights | None:
        """The layer's weights when the Triton W4A16 kernels run it as one row-layout block (no act-order
        permutation, no bias) and ``x`` is one contiguous row; else None."""
        blocks = getattr(layer, "int4_blocks", None)
        if not (blocks is not None and len(blocks) == 1 and isinstance(blocks[0], Int4RowWeights)
                and blocks[0].perm is None and layer.bias is None and x.dim() == 2 and x.shape[0] == 1
                and x.is_contiguous() and getattr(layer.int4_kernel, "reads_row_layout", False)):
            return None
        return blocks[0]

    def norm_epilogue(self) -> bool:
        """Whether dense decoder layers of these linears take their RMSNorms in the one-row GEMVs' epilogues
        (``device_kernels.EpilogueNormLayer``; ``INFERNEO_W4A16_NORM_EPILOGUE``)."""
        return envs.w4a16_norm_epilogue()

    def half_copies(self) -> bool:
        """Whether the epilogues also write the rows' paired float16 copies for the readers
        (``INFERNEO_W4A16_HALF_COPIES``, read at each call)."""
        return envs.w4a16_half_copies()

    def residual_norm_apply(self, layer: QuantizedLinear, x: torch.Tensor, residual: torch.Tensor,
                            norm_weight: torch.Tensor, eps: float, *, x_half: torch.Tensor | None = None,
                            half: bool = False) -> ScaledRow | None:
        """``residual += layer(x)`` in place for one row, with the RMSNorm after it left to the next W4A16 layer
        (``triton_int4.w4a16_residual_norm``): returns the :class:`ScaledRow` that :meth:`scaled_apply` reads,
        or None where the h2 kernel cannot take it (nothing is written; the caller projects, then normalizes).
        Float16 copies of bfloat16 rows (``kernels/scaled_row.py``): ``x_half``, ``x``'s; ``half``: the returned
        row carries its own (``ScaledRow.half``)."""
        block = self._epilogue_block(layer, x)
        if block is None:
            return None
        from inferneo.kernels.triton_int4 import w4a16_residual_norm

        half_out = (x.new_empty((1, layer.out_features), dtype=torch.float16)
                    if half and x.dtype == torch.bfloat16 and layer.out_features % 8 == 0 else None)
        out = w4a16_residual_norm(x, block, residual.view(1, -1), norm_weight, x_half=x_half, half_out=half_out)
        return None if out is None else ScaledRow(out[0], out[1], eps, half_out)

    def scaled_apply(self, layer: QuantizedLinear, row: ScaledRow, silu_mul: bool = False,
                     half_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """``layer(rmsnorm(r))`` from a :class:`ScaledRow` of ``r``, the norm's ``1 / rms`` applied to the
        products (``triton_int4.w4a16_linear`` with ``row_scale``), or None where the h2 kernel cannot take it
        (the caller normalizes the residual, then projects). ``silu_mul``: ``layer`` is a gated MLP's fused
        gate/up; where its one-row fused SiLU-and-mul launch is an h2 launch the activation is returned, else
        None. The products read ``row.half`` when there is one; ``half_out`` (with ``silu_mul``, a bfloat16 row):
        written with the activation's float16 copy when the activation is returned."""
        block = self._epilogue_block(layer, row.scaled)
        if block is None:
            return None
        from inferneo.kernels.triton_int4 import (
            RowScale,
            h2_epilogue_config,
            silu_fused_config,
            w4a16_linear,
            w4a16_silu_mul,
        )

        if silu_mul:  # (a fused launch of another kind cannot apply the row scale)
            config = silu_fused_config(row.scaled, block)
            run = w4a16_silu_mul
        else:
            config = h2_epilogue_config(row.scaled, block, producer=False)
            run = w4a16_linear
        if config is None or config.kind != "h2":
            return None
        copies = {"x_half": row.half}
        if silu_mul:
            copies["half_out"] = half_out
        elif half_out is not None:
            raise ValueError("scaled_apply: half_out goes with silu_mul")
        return run(row.scaled, block, config, row_scale=RowScale(row.square_sums, row.eps), **copies)

    @torch.no_grad()
    def init_dummy(self, layer: QuantizedLinear, generator: torch.Generator) -> None:
        """Random codes and zero points (random int32 words are valid codes in every layout), scales around
        ``0.02 / 8`` so the weights are about as large as dummy full-precision ones, float16 values as checkpoints
        store them; ``g_idx`` consecutive."""
        for name in self._checkpoint_names():
            param = getattr(layer, name, None)
            if param is None or name in ("g_idx", "weight_g_idx", "weight_shape"):
                continue
            if param.dtype == torch.int32:
                param.data.random_(-2**31, 2**31 - 1, generator=generator)
            else:
                param.data.uniform_(0.5 * 0.0025, 1.5 * 0.0025, generator=generator)
                param.data.copy_(param.data.to(torch.float16))


def _dequantize_block(block) -> torch.Tensor:
    if isinstance(block, Int4RowWeights):
        return dequantize_rows(block)
    if isinstance(block, Int4Weights):
        return dequantize(block)
    from inferneo.kernels.tinygemm_int4 import dequantize_tinygemm

    return dequantize_tinygemm(block)


def _tinygemm_inner_k_tiles(layer: QuantizedLinear, blocks: list[Int4Weights]) -> int | None:
    """``inner_k_tiles`` when the layer is to hold tinygemm's layout (one block, on CUDA, the launch table or
    ``INFERNEO_INT4_LAYOUT`` choosing it: :func:`~inferneo.kernels.tinygemm_int4.tinygemm_layout`), else None."""
    if layer.device.type != "cuda" or len(blocks) != 1:
        return None
    from inferneo.kernels.tinygemm_int4 import tinygemm_layout

    b = blocks[0]
    return tinygemm_layout(layer.device, layer.dtype, b.out_features, b.in_features, b.group_size)


def _shard_of(shape: LinearShape, rows: slice) -> int | None:
    for i in range(len(shape.output_sizes)):
        if shape.shard_offset(i) == rows.start and shape.output_sizes[i] == rows.stop - rows.start:
            return i if len(shape.output_sizes) > 1 else None
    return None


def _weight_shape_loader(layer: QuantizedLinear) -> WeightLoader:
    """compressed-tensors' ``weight_shape`` ``[out, in]`` of one shard (of the full layer, under tensor
    parallelism): shards add up their output rows; the parameter keeps this layer's own shape."""
    shape, parallel = layer.shape, layer.parallel
    sizes = shape.output_sizes if parallel is None else parallel.full_output_sizes
    in_features = shape.in_features if parallel is None else parallel.full_in_features

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        size = sum(sizes) if shard is None else sizes[shard]
        got = [int(v) for v in tensor.reshape(-1).tolist()]
        if got != [size, in_features]:
            raise ValueError(f"{shape.prefix}: weight_shape {got} does not match [{size}, {in_features}]")
        param.data.copy_(torch.tensor([shape.out_features, shape.in_features]))

    return load


def _hold_blocks(layer: QuantizedLinear, blocks: list) -> None:
    """Register the canonical tensors as buffers (so memory accounting and ``.to`` see them) and keep the
    records."""
    for i, block in enumerate(blocks):
        suffix = "" if len(blocks) == 1 else f"_{i}"
        layer.register_buffer(f"int4_packed{suffix}", block.packed)
        if hasattr(block, "scales_and_zeros"):  # tinygemm's layout
            layer.register_buffer(f"int4_scales_and_zeros{suffix}", block.scales_and_zeros)
        else:
            layer.register_buffer(f"int4_scales{suffix}", block.scales)
            layer.register_buffer(f"int4_zeros{suffix}", block.zeros)
        if block.perm is not None:
            layer.register_buffer(f"int4_perm{suffix}", block.perm)
    layer.int4_blocks = blocks


# ---- kernels -------------------------------------------------------------------------------------------------

Int4Kernel = Any  # Callable[[torch.Tensor, Int4Weights], torch.Tensor]


def reference_int4_linear(x: torch.Tensor, weights: Int4Weights) -> torch.Tensor:
    """The reference product: de-quantize (columns in the kernel's sorted order) in float32, then ``F.linear``
    in ``x``'s dtype."""
    from inferneo.quantization.int4_layouts import canonical_codes, dequantize_codes

    w = dequantize_codes(Int4Codes(canonical_codes(weights), weights.zeros, weights.scales, weights.group_size))
    return F.linear(x, w.to(x.dtype))


def select_int4_kernel(device: torch.device, dtype: torch.dtype, group_size: int, kernels: KernelConfig) -> Int4Kernel:
    """The product for a layer on ``device``: the native CPU kernel (``cpu_native_kernels`` on and it builds), the
    Triton W4A16 kernels on CUDA (Triton installed, a group size of whole words; they read the row layout, marked
    by the function's ``reads_row_layout``), else :func:`reference_int4_linear`."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from inferneo.kernels.cpu_int4 import cpu_int4_linear, int4_cpu_kernels

        if int4_cpu_kernels(kernels) is not None:
            return cpu_int4_linear
    if device.type == "cuda":
        try:
            from inferneo.kernels.triton_int4 import triton_int4_available, w4a16_linear
        except ImportError:  # no Triton
            return reference_int4_linear
        if triton_int4_available(group_size):
            return w4a16_linear
    return reference_int4_linear


# ---- de-quantizing weights that are not linear layers (MoE experts) ---------------------------------------------


def dequantize_int4_weights(weights: Iterable[tuple[str, torch.Tensor]],
                            scheme_of: Callable[[str], Int4Scheme | None],
                            keep: Container[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with the 4-bit tensors of each module outside ``keep`` (checkpoint module names of
    the quantized linear layers) replaced by its float32 ``<module>.weight``; ``scheme_of(module)`` is the module's
    scheme, or None for a module the format does not cover (its tensors pass unchanged).

    The engine's mixture-of-experts blocks hold their experts stacked for the fused-experts kernels, not as linear
    layers, so a 4-bit checkpoint's experts (``experts.0.gate_proj.qweight``, Mixtral's ``experts.0.w1.qweight``)
    load de-quantized, as FP8 experts do. A module's tensors wait for each other (checkpoints order them by name).
    Logs how many weights it de-quantized."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    layouts: dict[str, Int4Scheme] = {}
    count = 0

    def dequantized(module: str) -> tuple[str, torch.Tensor]:
        nonlocal count
        scheme, tensors = layouts.pop(module), waiting.pop(module)
        missing = scheme.expected_tensors() - set(tensors) - {"weight_shape", "g_idx", "weight_g_idx"}
        if missing:
            raise ValueError(f"{scheme.layout} checkpoint: {module} has {', '.join(sorted(tensors))} but not "
                             f"{', '.join(sorted(missing))}")
        count += 1
        return f"{module}.weight", dequantize_checkpoint_tensors(scheme.layout, tensors)

    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        scheme = None if module in keep else scheme_of(module)
        if scheme is None or leaf not in CHECKPOINT_TENSORS[scheme.layout]:
            yield name, tensor
            continue
        waiting.setdefault(module, {})[leaf] = tensor
        layouts[module] = scheme
        if scheme.expected_tensors() <= set(waiting[module]):
            yield dequantized(module)
    for module in list(waiting):
        yield dequantized(module)
    if count:
        logger.info("int4: de-quantized %d 4-bit weights at load into the model dtype (mixture-of-experts experts, "
                    "which run in the fused-experts kernels)", count)


# ---- the formats ---------------------------------------------------------------------------------------------


class _Int4Config(QuantConfig):
    """A 4-bit checkpoint format: every linear of the decoder layers except those listed as not converted, and
    the LM head where the checkpoint quantized it (GPTQ's ``lm_head: true``)."""

    def __init__(self, scheme: Int4Scheme, skip: tuple[str, ...] = (), lm_head: bool = False) -> None:
        self.scheme = scheme
        self.skip = skip
        self.lm_head = lm_head
        # Checkpoint modules that load into 4-bit layers (method_for records them); the checkpoint's other 4-bit
        # weights (mixture-of-experts experts) are de-quantized while loading.
        self.quantized_modules: set[str] = set()

    def method_for(self, shape: LinearShape) -> LinearMethod | None:
        if shape.prefix.startswith("lm_head") and not self.lm_head:
            return None
        # Each checkpoint module of a fused layer (q/k/v_proj of qkv_proj) is looked up on its own.
        if layer_listed(self, shape, self.skip, "modules_to_not_convert", match=contains_pattern):
            return None
        scheme = self.layer_scheme(shape)
        if scheme is None:
            return None
        self.quantized_modules.update(checkpoint_module_names(self, shape))
        return Int4LinearMethod(scheme)

    def layer_scheme(self, shape: LinearShape) -> Int4Scheme | None:
        """The scheme of layer ``shape``, or None to leave it full precision (default: the checkpoint's one)."""
        return self.scheme

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """4-bit weights of modules that are not 4-bit layers (MoE experts) become float32 (see
        :func:`dequantize_int4_weights`); the tensors of 4-bit layers pass unchanged."""
        yield from dequantize_int4_weights(weights, lambda module: self.scheme, self.quantized_modules)

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        allowed = _SUPPORTED_DTYPES.get(device.type)
        if allowed is None or dtype not in allowed:
            supported = "; ".join(f"{d}: {', '.join(str(t).removeprefix('torch.') for t in ts)}"
                                  for d, ts in _SUPPORTED_DTYPES.items())
            raise ValueError(f"{self.name} 4-bit weights cannot run on {device} in {dtype}; supported: {supported}")

    def describe(self) -> str:
        s = self.scheme
        extra = ", desc_act" if s.desc_act else ""
        return f"{self.name} (4-bit, group {s.group_size}, {'zero points' if s.zero_point else 'symmetric'}{extra})"


def _bits(cfg: dict[str, Any], fmt: str) -> None:
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"{fmt} with {bits}-bit weights is not supported; supported: bits 4")


class AwqConfig(_Int4Config):
    """AWQ checkpoints (``quant_method: awq``, ``version: gemm``, 4 bits)."""

    name = "awq"

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> AwqConfig:
        cfg = quantization_config
        _bits(cfg, "awq")
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq version {version!r} is not supported; supported: gemm")
        group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        scheme = Int4Scheme("awq", group, bool(cfg.get("zero_point", True)))
        return cls(scheme, tuple(cfg.get("modules_to_not_convert") or ()))


class GptqConfig(_Int4Config):
    """GPTQ checkpoints (``quant_method: gptq``, 4 bits, ``checkpoint_format: gptq``: v1 zero points; ``lm_head:
    true``: the LM head quantized too).

    GPTQModel's ``dynamic`` maps regular expressions over module names (matched from the start, as GPTQModel and
    vLLM do; here against each checkpoint module of a fused layer) to per-module settings: ``-:pattern`` leaves the
    modules full precision, ``+:pattern`` (or a bare pattern) overrides ``group_size`` / ``desc_act`` / ``sym`` /
    ``bits`` (4 only); the first matching pattern wins.
    """

    name = "gptq"

    def __init__(self, scheme: Int4Scheme, skip: tuple[str, ...] = (), lm_head: bool = False,
                 dynamic: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(scheme, skip, lm_head)
        self.dynamic = dict(dynamic or {})

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> GptqConfig:
        cfg = quantization_config
        _bits(cfg, "gptq")
        fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported; supported: gptq")
        scheme = Int4Scheme("gptq", int(cfg.get("group_size", 128)), zero_point=True,
                            desc_act=bool(cfg.get("desc_act", False)))
        dynamic = cfg.get("dynamic") or {}
        if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
            raise ValueError(f"gptq dynamic must map module-name patterns to settings; got {dynamic!r}")
        return cls(scheme, tuple(cfg.get("modules_to_not_convert") or ()), lm_head=bool(cfg.get("lm_head", False)),
                   dynamic=dynamic)

    def _dynamic_rule(self, module: str) -> tuple[str, dict[str, Any]] | None:
        """The first ``dynamic`` pattern matching checkpoint module ``module`` and its settings, or None."""
        for pattern, settings in self.dynamic.items():
            if re.match(pattern.removeprefix("-:").removeprefix("+:"), module):
                return pattern, settings
        return None

    def layer_scheme(self, shape: LinearShape) -> Int4Scheme | None:
        if not self.dynamic:
            return self.scheme
        names = checkpoint_module_names(self, shape)
        rules = [self._dynamic_rule(name) for name in names]
        if any(rule != rules[0] for rule in rules[1:]):
            raise ValueError(f"gptq: the checkpoint's dynamic settings differ between the parts of the fused layer "
                             f"{shape.prefix} ({', '.join(names)}); Inferneo runs a fused layer in one format")
        if rules[0] is None:
            return self.scheme
        pattern, settings = rules[0]
        if pattern.startswith("-:"):
            return None
        unknown = set(settings) - {"bits", "group_size", "desc_act", "sym"}
        if unknown:
            raise ValueError(f"gptq: dynamic {pattern!r} overrides {', '.join(sorted(unknown))} for {shape.prefix}; "
                             f"supported: bits (4), group_size, desc_act, sym")
        _bits({"bits": settings.get("bits", 4)}, f"gptq ({shape.prefix}, dynamic {pattern!r})")
        return replace(self.scheme, group_size=int(settings.get("group_size", self.scheme.group_size)),
                       desc_act=bool(settings.get("desc_act", self.scheme.desc_act)))
