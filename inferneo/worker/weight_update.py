"""New weights for a running model, and its weights set aside while the engine sleeps.

Two things make this more than ``model.load_weights``:

- On CPU, ``finalize_weights`` packs linears for their kernels (``cpu_linear``: :class:`PackedLinear`,
  :class:`PanelLinear`, and :class:`PanelEmbedding` for an embedding tied to a panel head): their plain weight is
  released, so the model's loader no longer finds ``...qkv_proj.weight``. :func:`plain_weights` lends those
  modules their plain weight (read back exactly from the packed form) as a parameter while the loader runs, and
  packs what it wrote afterwards. Every other fast path shares the parameters of the module it replaced
  (``device_kernels``), so a copy into the parameter is all it needs.
- Sleep mode frees the weights' memory: :func:`park_weights` moves every weight tensor (the parameters and the
  packed tensors above) to host memory (CUDA, sleep level 1) or drops it (level 2), and ``ParkedWeights.restore``
  brings them back, or zeros in their place for weights that were dropped (they must be loaded again). Tensors
  that several modules share (a tied embedding and output head) are moved once and stay shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from inferneo.model_executor.layers.cpu_linear import PackedLinear, PanelEmbedding, PanelLinear

# Modules that hold their weight in a packed layout, with ``plain_weight`` / ``load_plain_weight``.
PACKED_MODULES = (PackedLinear, PanelLinear, PanelEmbedding)
# Their weight tensors that are plain attributes, not parameters.
_PACKED_TENSORS = ("packed_weight", "bias", "table")


@contextlib.contextmanager
def plain_weights(model: nn.Module, names: set[str]) -> Iterator[None]:
    """While the block runs, every packed module whose ``<path>.weight`` or ``<path>.bias`` is in ``names`` holds
    its plain weight (and bias) as parameters of those names, so the model's loader can write them; when the block
    ends without an error the weights are packed again. The bias is the module's own tensor (written in place)."""
    opened: list[tuple[nn.Module, torch.Tensor | None]] = []
    try:
        for path, module in model.named_modules():
            if not isinstance(module, PACKED_MODULES) or not ({f"{path}.weight", f"{path}.bias"} & names):
                continue
            module.register_parameter("weight", _with_loader(module.plain_weight(), module, "weight_loader"))
            bias = getattr(module, "bias", None)
            if bias is not None:
                del module.bias
                module.register_parameter("bias", _with_loader(bias, module, "bias_loader"))
            opened.append((module, bias))
        yield
        for module, _ in opened:
            module.load_plain_weight(module.weight.detach())
    finally:
        for module, bias in opened:
            del module.weight
            if bias is not None:
                del module.bias
                module.bias = bias


def _with_loader(tensor: torch.Tensor, module: nn.Module, loader: str) -> nn.Parameter:
    """``tensor`` as a parameter, with the tensor-parallel slice loader the packed module kept (if any)."""
    param = nn.Parameter(tensor, requires_grad=False)
    if getattr(module, loader, None) is not None:
        param.weight_loader = getattr(module, loader)
    return param


@dataclass(slots=True)
class _Weight:
    """One weight tensor and every place that holds it: ``(module, attribute, is_parameter)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    slots: list[tuple[nn.Module, str, bool]] = field(default_factory=list)
    parked: torch.Tensor | None = None  # the host copy (None: dropped)


@dataclass(slots=True)
class ParkedWeights:
    """A model's weights moved off the device (or dropped) by :func:`park_weights`."""

    weights: list[_Weight]
    kept: bool

    def restore(self, device: torch.device) -> None:
        """Put the weights back on ``device``: the host copies, or zeros where they were dropped."""
        for weight in self.weights:
            if weight.parked is not None:
                tensor = weight.parked.to(device, non_blocking=True)
            else:
                tensor = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
            _assign(weight, tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights set aside."""
        return sum(torch.Size(w.shape).numel() * w.dtype.itemsize for w in self.weights)


def park_weights(model: nn.Module, keep: bool) -> ParkedWeights:
    """Move every weight tensor of ``model`` to host memory (``keep``; pinned when it was on CUDA) or drop it
    (``keep=False``: an empty tensor takes its place); the device memory is free once nothing else holds it."""
    weights = _weights_of(model)
    for weight in weights:
        module, attribute, is_parameter = weight.slots[0]
        tensor = getattr(module, attribute).data if is_parameter else getattr(module, attribute)
        if keep:
            pin = tensor.device.type == "cuda"
            host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=pin)
            weight.parked = host.copy_(tensor)
            _assign(weight, weight.parked)
        else:
            _assign(weight, torch.empty(0, dtype=weight.dtype, device=tensor.device))
    return ParkedWeights(weights, keep)


def _weights_of(model: nn.Module) -> list[_Weight]:
    """Every weight tensor of ``model`` (parameters, and the packed modules' tensors), one entry per storage view."""
    by_view: dict[tuple, _Weight] = {}
    for module in model.modules():
        places = [(name, True) for name, p in module._parameters.items() if p is not None]
        if isinstance(module, PACKED_MODULES):
            places += [(name, False) for name in _PACKED_TENSORS if getattr(module, name, None) is not None]
        for name, is_parameter in places:
            tensor = getattr(module, name)
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype, tensor.device)
            weight = by_view.setdefault(key, _Weight(tuple(tensor.shape), tensor.dtype))
            weight.slots.append((module, name, is_parameter))
    return list(by_view.values())


def _assign(weight: _Weight, tensor: torch.Tensor) -> None:
    for module, attribute, is_parameter in weight.slots:
        if is_parameter:
            getattr(module, attribute).data = tensor
        else:
            setattr(module, attribute, tensor)
