"""The seam between the model files and the quantized formats: a linear layer whose weight a format stores.

The model files build plain ``nn.Linear`` layers. When the checkpoint is quantized (or the user asks for online
quantization), :func:`quantize_linears` replaces each linear the format covers with a :class:`QuantizedLinear`
before the weights are loaded. The layer holds the format's parameters under the checkpoint's own names
(``weight`` + ``weight_scale`` for FP8, ``qweight``/``qzeros``/``scales`` for AWQ and GPTQ, ...), so the model's
``load_weights`` copies them like any other parameter: each carries a ``weight_loader(param, tensor, shard)`` that
places one logical shard (``q``/``k``/``v`` of a fused ``qkv_proj``, ``gate``/``up`` of ``gate_up_proj``) or, with
``shard=None``, the whole fused tensor. Once every weight is in, :func:`finalize_quantized_linears` lets each
method repack its tensors into the layout its kernel reads (and free the checkpoint layout).

A format may also keep a mixture-of-experts layer's stacked experts in its own layout: it replaces the layer's
``experts`` container with a :class:`QuantizedExperts` (same parameter names, the format's dtype and shapes) and
the layer's expert kernel with one that reads it (:meth:`QuantConfig.quantize_experts`; GGUF does, in
``gguf_experts.py``).

A format is a :class:`QuantConfig` (parsed from ``quantization_config`` in ``config.json``, from a GGUF file, or
asked for with ``--quantization``) that hands a :class:`LinearMethod` to each layer it quantizes.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.quantization.parallel import Axis, ParallelSlice, WeightLoader


@dataclass(frozen=True, slots=True)
class LinearShape:
    """The logical shape of a linear layer: ``y [*, out_features] = x [*, in_features] @ W.T``.

    ``output_sizes`` are the output rows of each logical shard the checkpoint stores separately (``q``, ``k``,
    ``v`` for a fused ``qkv_proj``); one entry for a plain layer. ``prefix`` is the layer's module name in the
    model (``layers.0.self_attn.qkv_proj``).
    """

    prefix: str
    in_features: int
    output_sizes: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return sum(self.output_sizes)

    def shard_offset(self, shard: int) -> int:
        """Output row where logical shard ``shard`` starts."""
        return sum(self.output_sizes[:shard])


class LinearMethod(abc.ABC):
    """How one format stores and runs a linear layer's weight (one instance may serve many layers)."""

    #: short name for logs and errors, e.g. ``"fp8"``, ``"awq"``
    name: str = "quantized"

    @abc.abstractmethod
    def create_weights(self, layer: QuantizedLinear) -> None:
        """Register the format's checkpoint parameters on ``layer`` (``layer.register_parameter``, on
        ``layer.device``), each with ``requires_grad=False`` and a ``weight_loader`` attribute (see
        :func:`row_shard_loader`, :func:`per_shard_loader`)."""

    def finalize(self, layer: QuantizedLinear, kernels: KernelConfig) -> None:  # noqa: B027 - optional hook
        """After loading: repack into the kernel's layout, choose the kernel for ``layer.device`` (default:
        nothing)."""

    @abc.abstractmethod
    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` (without the bias, which the layer adds): ``x`` is ``[*, in_features]`` in the model dtype;
        the result ``[*, out_features]`` in ``x``'s dtype."""

    @abc.abstractmethod
    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        """``W`` as a float32 ``[out_features, in_features]`` tensor (the reference the kernels are tested
        against; works before and after :meth:`finalize`)."""

    def init_dummy(self, layer: QuantizedLinear, generator: torch.Generator) -> None:
        """Fill the layer with random quantized weights (``load_format="dummy"`` benchmarks)."""
        raise ValueError(f"{self.name} layers cannot be filled with dummy weights")

    def weight_bytes(self, layer: QuantizedLinear) -> int:
        """Bytes the layer's weight tensors hold (parameters and buffers; for memory accounting)."""
        return sum(t.numel() * t.element_size() for t in (*layer.parameters(recurse=False),
                                                          *layer.buffers(recurse=False)))


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored and multiplied by a :class:`LinearMethod`.

    ``bias`` (when the layer has one) is a plain parameter in the model dtype, loaded like any other.
    """

    # Set by a method's ``finalize`` where one call computes the whole layer (``x [M, in] -> [M, out]``, no bias):
    # callers on a hot path may call it instead of the module (``device_kernels.NativeDecoderLayer``).
    single_matmul: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Set by a method's ``finalize`` for a gate/up projection whose kernel also applies SiLU-and-mul: ``x [M, in] ->
    # silu(gate) * up [M, out / 2]``, or None for row counts it does not take (``NativeDecoderLayer``).
    silu_matmul: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, method: LinearMethod, shape: LinearShape, bias: bool, dtype: torch.dtype,
                 device: torch.device, parallel: ParallelSlice | None = None) -> None:
        super().__init__()
        self.method = method
        self.shape = shape
        self.in_features = shape.in_features
        self.out_features = shape.out_features
        self.dtype = dtype  # the model's compute dtype (activations, bias)
        self.device = torch.device(device)
        # With tensor parallelism, the part of the full layer this rank holds: every parameter's loader cuts it
        # out of the full checkpoint tensors (``parallel_loader``).
        self.parallel = parallel
        if bias:
            self.bias = nn.Parameter(torch.zeros(shape.out_features, dtype=dtype, device=device), requires_grad=False)
            self.bias.weight_loader = parallel_loader(self, row_shard_loader(shape, dim=0))
        else:
            self.bias = None
        method.create_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.method.name}, in_features={self.in_features}, out_features={self.out_features}"


class RowParallelQuantizedLinear(QuantizedLinear):
    """A row-parallel quantized layer (``o_proj``, ``down_proj`` under tensor parallelism): this rank's input
    columns give a partial sum, which is all-reduced over the ranks before the bias is added once."""

    def __init__(self, method: LinearMethod, shape: LinearShape, bias: bool, dtype: torch.dtype,
                 device: torch.device, parallel: ParallelSlice, all_reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> None:
        super().__init__(method, shape, bias, dtype, device, parallel)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.all_reduce(self.method.apply(self, x))
        return y if self.bias is None else y + self.bias


# ---- weight loaders ----------------------------------------------------------------------------------------------


def _check_and_copy(dest: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(src.shape)}, the layer expects "
                         f"{tuple(dest.shape)}")
    dest.copy_(src)


def row_shard_loader(shape: LinearShape, dim: int, per_row: Sequence[int] = (1, 1)) -> WeightLoader:
    """A loader for a tensor whose ``dim`` runs over output rows: shard ``i`` goes at ``shape.shard_offset(i)``.

    ``per_row = (n, d)`` says that ``n / d`` entries of ``dim`` stand for one output row (AWQ packs 8 output columns
    into one int32: ``(1, 8)``; a 128-row FP8 block scale: ``(1, 128)``); offsets and sizes must then divide
    exactly.
    """
    num, den = per_row

    def scaled(rows: int, what: str, kind: str) -> int:
        if (rows * num) % den:
            raise ValueError(f"{what}: its {kind} ({rows} output rows) is not a whole number of the format's groups "
                             f"of {den} rows (a fused layer's shards must start and end on a group)")
        return rows * num // den

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        what = f"{shape.prefix} ({'all shards' if shard is None else f'shard {shard}'})"
        if shard is None:
            _check_and_copy(param.data, tensor, what)
            return
        start = scaled(shape.shard_offset(shard), what, "offset in the fused layer")
        size = scaled(shape.output_sizes[shard], what, "size")
        _check_and_copy(param.data.narrow(dim, start, size), tensor, what)

    load.rows_axis = Axis(dim, num, den)  # for ``parallel_loader``: this dim runs over the output rows
    return load


def per_shard_loader(shape: LinearShape) -> WeightLoader:
    """A loader for a parameter with one entry per logical shard along dim 0 (a per-tensor FP8 scale of each of
    ``q``, ``k``, ``v``): shard ``i`` fills entry ``i``; the whole (``shard=None``) fills them all."""

    def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        what = f"{shape.prefix} ({'all shards' if shard is None else f'shard {shard}'})"
        target = param.data if shard is None else param.data[shard]
        if tensor.numel() == 1:
            target.copy_(tensor.reshape(()).expand_as(target) if target.dim() else tensor.reshape(()))
        else:
            _check_and_copy(target, tensor, what)

    return load


def parallel_loader(layer: QuantizedLinear, loader: WeightLoader, cols: Axis | None = None) -> WeightLoader:
    """``loader`` as ``layer`` needs it: unchanged on one rank; with tensor parallelism (``layer.parallel``) fed
    this rank's part of each full checkpoint tensor, along the output rows the loader's ``rows_axis`` names (from
    :func:`row_shard_loader`) and along ``cols``, the dim of the checkpoint tensor that runs over the input
    columns (None: it has none, or every rank takes all of it)."""
    if layer.parallel is None:
        return loader
    return layer.parallel.loader(loader, getattr(loader, "rows_axis", None), cols, layer.shape.prefix)


def new_parameter(layer: QuantizedLinear, name: str, shape: Sequence[int], dtype: torch.dtype,
                  loader: WeightLoader, fill: float = 0, *, cols: Axis | None = None) -> nn.Parameter:
    """Register parameter ``name`` of ``shape``/``dtype`` on ``layer`` (filled with ``fill``), with ``loader``;
    ``cols``: the checkpoint tensor's dim that runs over the input columns (see :func:`parallel_loader`)."""
    param = nn.Parameter(torch.full(tuple(shape), fill, dtype=dtype, device=layer.device), requires_grad=False)
    param.weight_loader = parallel_loader(layer, loader, cols)
    param.quantized = True
    layer.register_parameter(name, param)
    return param


# ---- the format ----------------------------------------------------------------------------------------------


class QuantConfig(abc.ABC):
    """A quantization format with its settings, as one checkpoint (or the ``--quantization`` flag) gives them."""

    #: the ``quant_method`` / ``--quantization`` name
    name: str = "quantized"

    @abc.abstractmethod
    def method_for(self, shape: LinearShape) -> LinearMethod | None:
        """The method for the linear layer ``shape.prefix`` (engine names: ``layers.0.self_attn.qkv_proj``), or None
        to leave it a plain ``nn.Linear`` in the model dtype (``lm_head``, layers the checkpoint lists as
        ignored)."""

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:  # noqa: B027 - optional hook
        """Raise ValueError naming the format, the device and what is supported when this format cannot run
        on ``device`` in ``dtype`` (called before the model is built)."""

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's ``(name, tensor)`` pairs as the model should load them (default: unchanged). A format
        drops tensors it does not use here, or renames them."""
        yield from weights

    def quantize_embeddings(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
        """Replace the embedding modules the format stores (GGUF keeps the token embedding in its blocks, and
        the LM head tied to it); called by :func:`quantize_linears` before the linears. Returns how many modules
        changed (default: none)."""
        return 0

    def quantize_experts(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
        """Replace the stacked experts of the mixture-of-experts layers the format stores in its own layout with
        :class:`QuantizedExperts`; called by :func:`quantize_linears` after the embeddings. Returns how many layers
        changed, and logs them (default: none: experts load de-quantized into the model dtype)."""
        return 0

    def checkpoint_name(self, prefix: str) -> str:
        """Checkpoint module name of engine layer ``prefix`` (HF's ``model.`` prefix), for ``ignore`` lists."""
        return prefix if prefix.startswith("lm_head") else f"model.{prefix}"

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.name


class QuantizedExperts(nn.Module):
    """The stacked experts of a ``FusedMoE`` held in a format's layout, in place of its ``experts`` container:
    parameters ``gate_up_proj`` (gate rows, then up rows, per expert) and ``down_proj``, each ``[E, rows, ...]`` in
    the format's dtype, which the layer's expert kernel (set by the format) reads."""

    def finalize(self, kernels: KernelConfig) -> None:  # noqa: B027 - optional hook
        """Pick the kernels (and repack, if need be) once the weights are in; called by
        :func:`finalize_quantized_linears`."""

    @abc.abstractmethod
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts as full-width float32 ``(gate_up [E, 2*I, H], down [E, H, I])`` (for tests and references)."""

    @abc.abstractmethod
    def init_dummy(self, generator: torch.Generator) -> None:
        """Random weights in the format (``--load-format dummy``)."""


# ---- the transform -------------------------------------------------------------------------------------------


def linear_shape(model: nn.Module, prefix: str, linear: nn.Linear) -> LinearShape:
    """The logical shape of ``model``'s linear ``prefix``: its shards from the model's ``stacked_params`` (a fused
    layer the checkpoint stores in parts), else one shard."""
    fused = prefix.rsplit(".", 1)[-1]
    stacked = {f for _, f, _ in getattr(model, "stacked_params", ())}
    sizes: Sequence[int] = (linear.out_features,)
    if fused in stacked and hasattr(model, "_shard_sizes"):
        sizes = model._shard_sizes(fused, linear.weight)
    if sum(sizes) != linear.out_features:
        raise ValueError(f"{prefix}: shard sizes {list(sizes)} do not add up to {linear.out_features} rows")
    return LinearShape(prefix, linear.in_features, tuple(int(s) for s in sizes))


_LAYER_PREFIX = re.compile(r"layers\.(\d+)\.")


def quantize_linears(model: nn.Module, config: QuantConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` of ``model`` that ``config`` covers with a :class:`QuantizedLinear` (before the
    weights are loaded; after ``model.cast``; a tensor-parallel rank's sharded linear, which carries its
    ``parallel_slice``, with one holding the same part of the layer; a pipeline stage's layers under their
    checkpoint numbers), after the format's embeddings
    (:meth:`QuantConfig.quantize_embeddings`); returns how many modules changed. Tied linears (an ``lm_head``
    sharing the embedding) and linears marked ``quantizable = False`` (a router's gate, weights another module
    reads directly) stay plain. Mixture-of-experts layers whose experts the format stores go in too
    (:meth:`QuantConfig.quantize_experts`, which logs them; not counted here)."""
    swapped = config.quantize_embeddings(model, dtype, device)
    config.quantize_experts(model, dtype, device)
    first_layer = getattr(getattr(model, "pipeline_stage", None), "start", 0)  # a pipeline stage's first layer
    tied = {id(p) for name, m in model.named_modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            parallel: ParallelSlice | None = getattr(child, "parallel_slice", None)
            if ((type(child) is not nn.Linear and parallel is None) or id(child.weight) in tied
                    or not getattr(child, "quantizable", True)):
                continue
            prefix = f"{parent_name}.{name}" if parent_name else name
            if first_layer and (match := _LAYER_PREFIX.match(prefix)):  # the checkpoint's layer number
                prefix = f"layers.{int(match[1]) + first_layer}.{prefix[match.end():]}"
            shape = (linear_shape(model, prefix, child) if parallel is None  # a rank's shard: its own rows
                     else LinearShape(prefix, parallel.local_in_features, parallel.local_output_sizes))
            method = config.method_for(shape)
            if method is None:
                continue
            bias = child.bias is not None
            if parallel is not None and parallel.reduces:
                layer = RowParallelQuantizedLinear(method, shape, bias, dtype, device, parallel, child.tp.all_reduce)
            else:
                layer = QuantizedLinear(method, shape, bias, dtype, device, parallel)
            setattr(parent, name, layer)
            swapped += 1
    return swapped


def quantized_linears(model: nn.Module) -> list[QuantizedLinear]:
    """The model's quantized layers."""
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def quantized_experts(model: nn.Module) -> list[QuantizedExperts]:
    """The model's experts held in a format's layout."""
    return [m for m in model.modules() if isinstance(m, QuantizedExperts)]


def finalize_quantized_linears(model: nn.Module, kernels: KernelConfig) -> int:
    """Let each quantized layer (and each :class:`QuantizedExperts`) repack its loaded tensors for its kernel (call
    once, after loading and before the device kernels go in); returns how many linear layers."""
    layers = quantized_linears(model)
    for layer in layers:
        layer.method.finalize(layer, kernels)
    for experts in quantized_experts(model):
        experts.finalize(kernels)
    return len(layers)


def is_quantized_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` is one of a format's tensors (made by :func:`new_parameter`; dummy-weight init leaves
    them to the method's ``init_dummy``)."""
    return bool(getattr(param, "quantized", False))
