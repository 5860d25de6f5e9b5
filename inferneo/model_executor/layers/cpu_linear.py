"""Packed matmuls for CPU inference, applied to a built model as a transform.

PyTorch's CPU ``nn.Linear`` goes through MKL for float32, which runs far below the machine's peak on AMD
processors. oneDNN with a weight packed once ahead of time runs the same float32 math about 2.4x faster here
(and helps bfloat16 at small batch sizes). On AVX-512 machines layers go one step further, through the native
panel kernel (``inferneo/csrc/cpu_kernels.cpp``; bfloat16 needs AVX512_BF16): it overlaps the stream of weights
from memory with the arithmetic, which is what decode batches are bound by, and runs about 1.3x faster than
oneDNN on them; on Intel CPUs with AMX, oneDNN (which runs bfloat16 on the AMX tiles) is the faster one. On
AVX2-only CPUs the panel kernel has an 8-lane form: float32, and bfloat16 weights widened to float32 in registers
(oneDNN cannot pack bfloat16 there, so such layers would otherwise run PyTorch's slow bfloat16 ``F.linear``). So
:func:`pack_linears` chooses per CPU and layer shape (``cpu_linear_tune``: the candidates the CPU's features allow,
timed at start-up where there are several). The results differ from MKL's only in summation order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu import cpu_kernels
from inferneo.kernels.cpu_select import LinearKernel, LinearShape
from inferneo.model_executor.layers.cpu_linear_tune import DECODE_ROWS, LinearChooser, decode_sample

_PACKABLE = (torch.float32, torch.bfloat16)
_PANEL_LAYOUTS = (LinearKernel.PANEL, LinearKernel.PANEL_MATMUL)  # kernels that re-lay a tied weight out as panels


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this PyTorch build can run prepacked oneDNN linears in ``dtype`` on this CPU (oneDNN packs
    bfloat16 only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; tried once per dtype)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return _onednn_packs(dtype)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs a weight of ``dtype`` on this CPU (a hardware fact, so cached per process)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` through oneDNN, with ``W`` held in oneDNN's packed layout.

    ``prepack=False`` keeps ``W`` as it is (the linear's own tensor, not a copy) and lets oneDNN read the plain
    layout: for a weight another module shares (an output head tied to the embedding), where a packed copy would
    hold the weight twice (``pack_linears`` uses it for a tied bfloat16 head without the panel kernel; a tied
    float32 head goes to :class:`PanelLinear`, faster there). Measured on the 2-core AVX2 test machine with
    SmolLM2-135M's head (49152 x 576, float32, one thread): 8% slower than the packed weight at 1 row, 40% at 8 rows,
    12% at 32; faster than PyTorch's own ``F.linear`` at every size measured (1-256 rows, two threads).
    """

    def __init__(self, linear: nn.Linear, prepack: bool = True) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # a tensor-parallel shard's loaders (``model_executor.tensor_parallel``), for weight updates
        self.weight_loader = getattr(linear.weight, "weight_loader", None)
        self.bias_loader = None if linear.bias is None else getattr(linear.bias, "weight_loader", None)
        self.prepacked = prepack
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 64) if prepack else weight
        self.bias = None if linear.bias is None else linear.bias.detach()

    def plain_weight(self) -> torch.Tensor:
        """``W`` as ``[out_features, in_features]``: the shared tensor itself when not prepacked; else read back
        through the kernel (identity rows times ``W.T``: every product is by 1 or 0, so the values are exact)."""
        if not self.prepacked:
            return self.packed_weight
        rows = []
        dtype = self.packed_weight.dtype
        for start in range(0, self.in_features, 1024):
            count = min(1024, self.in_features - start)
            eye = torch.zeros(count, self.in_features, dtype=dtype)
            eye[:, start:start + count].fill_diagonal_(1)
            rows.append(torch.ops.mkldnn._linear_pointwise(eye, self.packed_weight, None, "none", [], ""))
        return torch.cat(rows).t().contiguous()

    def load_plain_weight(self, weight: torch.Tensor) -> None:
        """Take a new ``W`` (``[out_features, in_features]``): packed again, or copied into the shared tensor."""
        if self.prepacked:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
        elif weight.data_ptr() != self.packed_weight.data_ptr():
            self.packed_weight.copy_(weight)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + b``; with ``out`` (a ``[rows, out_features]`` tensor), the result is also copied there."""
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # the engine's token batches are flat
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        if out is not None:
            y = out.copy_(y)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


PANEL_WIDTH = 48  # output columns per packed panel of the AVX-512 build and of the PyTorch panel path


def panel_width(ops) -> int:
    """Output columns per packed panel for ``ops`` (the native module: 48 with AVX-512, 16 with AVX2, its
    ``kPanel``), or :data:`PANEL_WIDTH` for the PyTorch panel path (``ops=None``)."""
    return PANEL_WIDTH if ops is None else ops.panel_width()


def panel_kernels(dtype: torch.dtype = torch.float32, kernels: KernelConfig | None = None, *,
                  avx2_float32_panel: bool = False):
    """The native module when its panel linear can run here in ``dtype`` (an AVX-512 build, bfloat16 also with
    AVX512_BF16; or an AVX2 + FMA + F16C build, either dtype) with the ``cpu_native_linear`` and
    ``cpu_native_kernels`` switches on (``kernels``; None: the environment's), else None. On an AVX2 build float32
    layers stay with oneDNN unless ``avx2_float32_panel`` (a per-CPU tune may time both): the AVX2 panel kernel was
    faster at one row only on the test machine, while bfloat16 has no oneDNN packing there at all."""
    kernels = kernels or KernelConfig.from_env()
    if not kernels.cpu_native_linear:
        return None
    ops = cpu_kernels(kernels)
    if ops is None or not ops.panel_linear_available():
        return None
    if dtype == torch.bfloat16:
        return ops if ops.panel_linear_bf16_available() else None
    if dtype == torch.float32 and ops.vector_isa() == "avx2" and not avx2_float32_panel:
        return None  # oneDNN's AVX2 float32 kernels ran faster at 16+ rows (docs/benchmarks.md, issue 23)
    return ops if dtype == torch.float32 else None


class PanelLinear(nn.Module):
    """``y = x @ W.T + b`` through the native panel kernel, float32 or bfloat16.

    ``W`` is stored in panels of ``P`` output columns (:func:`panel_width`: 48 for the AVX-512 kernel, 16 for the
    AVX2 one, whose 16-column blocks then read consecutive lines): float32 as [panels, K, P]; bfloat16 as
    [panels, K/2, P, 2] (consecutive pairs along K per column, K padded to even), the operand layout of the
    AVX512_BF16 dot product; the AVX2 kernel widens each pair to float32 with a shift and a mask.

    ``ops=None`` (float32 only) multiplies the panels with PyTorch's batched matmul instead: the layout of an output
    head tied to the embedding on CPUs without the panel kernel, where :class:`PanelEmbedding` reads the rows back
    (one copy of the weight). Measured on the 2-core AVX2 test machine with SmolLM2-135M's head (49152 x 576, one
    thread, CPU time): as fast as oneDNN's packed weight at 1 row, 15% slower at 8 rows and 4% at 32 (oneDNN on the
    plain weight: 8% slower at 1 row, 40% at 8, 12% at 32).
    """

    def __init__(self, linear: nn.Linear, ops) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._ops = ops
        self.packed_weight = panel_layout(linear.weight.detach(), panel_width(ops))
        # a tensor-parallel shard's loaders (``model_executor.tensor_parallel``), for weight updates
        self.weight_loader = getattr(linear.weight, "weight_loader", None)
        self.bias_loader = None if linear.bias is None else getattr(linear.bias, "weight_loader", None)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def plain_weight(self) -> torch.Tensor:
        """``W`` as ``[out_features, in_features]``, read back from the panels (a copy; exact)."""
        return panel_rows(self.packed_weight, self.out_features, self.in_features)

    def load_plain_weight(self, weight: torch.Tensor) -> None:
        """Take a new ``W``: laid out in panels into the same tensor (a tied :class:`PanelEmbedding` reads it)."""
        self.packed_weight.copy_(panel_layout(weight, self.packed_weight.shape[2]))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + b``; with ``out`` (a contiguous ``[rows, out_features]`` tensor) written there."""
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        if self._ops is None:
            y = self._panel_matmul(flat, out)
        else:
            y = self._ops.panel_linear(flat, self.packed_weight, self.bias, self.out_features, out)
        return y if x.dim() == 2 else y.view(*shape[:-1], self.out_features)

    def _panel_matmul(self, flat: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The float32 panels through ``torch.matmul``: [panels, rows, 48] products, laid out as [rows, N]."""
        if self.packed_weight.dim() != 3:
            raise ValueError("PanelLinear without the native kernel runs float32 panels only")
        rows = flat.shape[0]
        panels, width = self.packed_weight.shape[0], self.packed_weight.shape[2]
        y = torch.matmul(flat, self.packed_weight).transpose(0, 1).reshape(rows, panels * width)
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous() if out is None else out.copy_(y)


def panel_layout(weight: torch.Tensor, width: int) -> torch.Tensor:
    """``weight`` (``[N, K]``) in :class:`PanelLinear`'s panels of ``width`` output columns (N padded to whole
    panels; bfloat16 as consecutive pairs along K, K padded to even)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // width)
    padded = F.pad(weight, (0, 0, 0, panels * width - out_features))
    if weight.dtype == torch.bfloat16:
        pairs = -(-in_features // 2)
        padded = F.pad(padded, (0, 2 * pairs - in_features))
        return padded.view(panels, width, pairs, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(panels, width, in_features).transpose(1, 2).contiguous()


def panel_rows(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of :func:`panel_layout`: the ``[out_features, in_features]`` weight (a copy)."""
    if packed.dim() == 3:  # [panels, K, P]
        panels, k, width = packed.shape
        return packed.transpose(1, 2).reshape(panels * width, k)[:out_features].contiguous()
    panels, pairs, width, _ = packed.shape  # [panels, K/2, P, 2]
    rows = packed.permute(0, 2, 1, 3).reshape(panels * width, pairs * 2)
    return rows[:out_features, :in_features].contiguous()


class PanelEmbedding(nn.Module):
    """The lookup of an embedding tied to a :class:`PanelLinear` output head, read from the head's panels: token
    ``t`` is output column ``t``, i.e. ``packed_weight[t // P, :, t % P]`` for panels of ``P`` columns (bfloat16:
    that column's pairs, the padding along K dropped). The embedding's own table is released, so the tied weight
    is held once, in the layout the head's kernel reads. The rows equal the original table's exactly (a gather, no arithmetic)."""

    def __init__(self, head: PanelLinear) -> None:
        super().__init__()
        self.embedding_dim = head.in_features
        self.num_embeddings = head.out_features
        self.table = head.packed_weight  # shared with the head, not a copy; not a registered buffer of this module

    def plain_weight(self) -> torch.Tensor:
        """The ``[num_embeddings, embedding_dim]`` table, read back from the head's panels (a copy; exact)."""
        return panel_rows(self.table, self.num_embeddings, self.embedding_dim)

    def load_plain_weight(self, weight: torch.Tensor) -> None:
        """Take a new table: laid out in panels into the tensor the tied head reads too."""
        self.table.copy_(panel_layout(weight, self.table.shape[2]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        width = self.table.shape[2]  # float32 [panels, K, P]; bfloat16 [panels, K/2, P, 2]
        panel, column = flat // width, flat % width
        if self.table.dim() == 3:
            rows = self.table[panel, :, column]
        else:
            rows = self.table[panel, :, column, :].reshape(flat.shape[0], -1)[:, : self.embedding_dim]
        return rows.reshape(*ids.shape, self.embedding_dim)


# A CPU MLP over many tokens (a prompt) runs in passes of rows whose gate/up activation fits in this many bytes.
# In one pass, a 2,048-token step's [rows, 2 x intermediate] activation is tens of MB and leaves the caches
# between the gate/up matmul, SiLU and the down matmul; in passes it stays in L2. Measured on the 2-core test
# machine with SmolLM2-135M's shapes (float32: passes of 128 rows): the MLP runs 1.08x faster at 2,048 rows and
# 1.5x at 4,096; bfloat16 (passes of 256 rows) is about even (benchmarks/cpu_prefill_step.py, docs/benchmarks.md).
MLP_PASS_BYTES = 1536 * 1024


def mlp_row_chunk(x: torch.Tensor, gate_up: nn.Module, down: nn.Module) -> int | None:
    """Rows per pass for a CPU MLP over ``x`` when both layers are packed CPU linears and ``x`` is long enough
    to gain from passes; else None (one pass)."""
    if x.dim() != 2 or x.device.type != "cpu":
        return None
    if not all(isinstance(layer, (PanelLinear, PackedLinear)) for layer in (gate_up, down)):
        return None
    rows = max(8, MLP_PASS_BYTES // (gate_up.out_features * x.element_size()) // 8 * 8)
    return rows if x.shape[0] >= 2 * rows else None


def pack_linears(model: nn.Module, kernels: KernelConfig | None = None, *, chooser: LinearChooser | None = None,
                 decode_rows: int = DECODE_ROWS) -> int:
    """Swap every CPU ``nn.Linear`` of a float32/bfloat16 model for the kernel chosen for its dtype and shape;
    returns how many were swapped (a layer left to ``torch`` stays an ``nn.Linear``).

    The kernel is chosen per CPU and shape (:class:`~inferneo.model_executor.layers.cpu_linear_tune.LinearChooser`:
    the candidates this CPU has, measured at start-up where there are several; ``chooser`` None: one built from
    ``kernels``, None: the environment's, timing decode steps of ``decode_rows`` rows) and logged once: the native
    panel kernel (:class:`PanelLinear`), oneDNN (:class:`PackedLinear`) or PyTorch's own ``F.linear``.

    Call after the weights are loaded. Layers marked ``packable = False`` (tensor-parallel layers whose forward does
    more than the matmul) are left alone. Each weight is held once afterwards: a layer's unpacked weight is released
    with the layer, and a weight another module shares (an output head tied to the embedding) is not copied: in
    panels (through the panel kernel, or in float32 through ``torch.matmul``) the embeddings sharing it read their
    rows from those panels (:class:`PanelEmbedding`); oneDNN runs on the shared plain weight (``prepack=False``).
    """
    kernels = kernels or KernelConfig.from_env()
    panel_ops = {dtype: panel_kernels(dtype, kernels, avx2_float32_panel=True) for dtype in _PACKABLE}
    chooser = chooser or LinearChooser(kernels, functools.partial(kernel_built, panel_ops),
                                       decode_rows=decode_rows)
    sharers = _weight_sharers(model)
    groups: dict[tuple[torch.dtype, LinearShape], list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and getattr(child, "packable", True)
                    and child.weight.device.type == "cpu" and child.weight.dtype in _PACKABLE):
                shape = LinearShape(child.out_features, child.in_features, id(child.weight) in sharers)
                groups.setdefault((child.weight.dtype, shape), []).append((parent, name, child))
    swapped = 0
    for (dtype, shape), members in groups.items():
        ops = panel_ops[dtype]
        # one choice for the group; a tied head on its own (whether its sharers read rows only decides its kernels)
        for unit in [[member] for member in members] if shape.tied else [members]:
            layers = [layer for _, _, layer in unit]
            shared = sharers.get(id(layers[0].weight), []) if shape.tied else []
            rows_only = all(_reads_rows_only(module) for _, _, module in shared)
            kernel = chooser.choose(
                dtype, shape, decode_sample(layers),
                functools.partial(linear_module, ops=ops, tied=shape.tied),
                head=shape.tied or all(name == "lm_head" for _, name, _ in unit),
                allowed=lambda k, rows_only=rows_only: rows_only or k not in _PANEL_LAYOUTS)
            if kernel is LinearKernel.TORCH:
                continue
            for parent, name, layer in unit:
                packed = linear_module(kernel, layer, ops=ops, tied=shape.tied)
                if isinstance(packed, PanelLinear):
                    for owner, attr, _ in shared:
                        setattr(owner, attr, PanelEmbedding(packed))
                setattr(parent, name, packed)
                swapped += 1
    chooser.log()
    return swapped


def kernel_built(panel_ops: dict, kernel: LinearKernel, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` was built here for ``dtype`` (``panel_ops``: :func:`panel_kernels` of each dtype; oneDNN:
    this PyTorch's)."""
    if kernel is LinearKernel.PANEL:
        return panel_ops.get(dtype) is not None
    if kernel is LinearKernel.PANEL_MATMUL:
        return dtype == torch.float32
    if kernel is LinearKernel.ONEDNN:
        return onednn_available(dtype)
    return True


def linear_module(kernel: LinearKernel, linear: nn.Linear, *, ops, tied: bool) -> nn.Module:
    """The module ``kernel`` runs ``linear`` as (a tied weight is never copied: oneDNN reads it unpacked)."""
    if kernel is LinearKernel.PANEL:
        return PanelLinear(linear, ops)
    if kernel is LinearKernel.PANEL_MATMUL:
        return PanelLinear(linear, None)
    if kernel is LinearKernel.ONEDNN:
        return PackedLinear(linear, prepack=not tied)
    return linear


def _weight_sharers(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, nn.Module]]]:
    """``id(weight) -> [(parent, child name, child), ...]`` of the modules other than linears that hold a linear's
    weight as their own parameter (a tied embedding)."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    sharers: dict[int, list[tuple[nn.Module, str, nn.Module]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                continue
            for param in child.parameters(recurse=False):
                if id(param) in linear_weights:
                    sharers.setdefault(id(param), []).append((parent, name, child))
    return sharers


def _reads_rows_only(module: nn.Module) -> bool:
    """Whether ``module`` only looks rows up in its weight (a plain ``nn.Embedding``), so a
    :class:`PanelEmbedding` can replace it."""
    return type(module) is nn.Embedding and module.max_norm is None
