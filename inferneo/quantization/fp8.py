"""FP8 (e4m3) weights: ``quant_method: fp8`` checkpoints, ``--quantization fp8`` (online), and the linear method
compressed-tensors ``float-quantized`` checkpoints use too.

A weight ``W [out, in]`` is stored as e4m3 values ``q`` with float32 scales, ``W = q * s``:

- ``tensor``: one scale per tensor (``weight_scale``, a scalar). A fused engine layer (``qkv_proj``,
  ``gate_up_proj``) receives one scale per logical shard; at finalize they become one scale per output row (each
  row keeps its shard's scale), so the weights are used exactly as the checkpoint stores them (no requantization)
  and the GEMM runs with row-wise weight scales.
- ``channel``: one scale per output row (compressed-tensors ``weight_scale [out, 1]``; ``--quantization fp8``).
- ``block``: one scale per ``block = (128, 128)`` tile (``weight_scale_inv [ceil(out/128), ceil(in/128)]``,
  DeepSeek-V3 style); activations are then quantized per token and per 128 input columns.

Activations are quantized at run time: ``dynamic_token`` (one scale per token, ``max|x| / 448``),
``dynamic_tensor`` (one per call) or ``static_tensor`` (the checkpoint's ``input_scale``; a fused layer takes the
largest of its shards' scales, as its shards read the same input).

Where it runs:

- CUDA, compute capability >= 8.9 (Ada, Hopper and later): ``torch._scaled_mm`` (per-tensor scales, or row-wise
  scales: per-token activation x per-row weight), and a Triton block-scaled GEMM for ``block`` weights
  (:mod:`inferneo.kernels.triton_fp8`). Inputs of a few rows (batch-1 decode steps; up to
  ``triton_fp8_gemv.max_rows()``) instead take a weight-only Triton GEMV (:mod:`inferneo.kernels.triton_fp8_gemv`:
  the e4m3 weight de-quantized in registers, the bf16/fp16 activations not quantized, the gated MLP's gate/up +
  SiLU in one kernel), switched by ``KernelConfig.fp8_gemv``. Older GPUs are refused at start-up.
- CPU: no CPU here has FP8 arithmetic; ``torch._scaled_mm`` on CPU measured 3.5-160x slower than the faster of
  float32 and bfloat16 ``F.linear`` on a 2-core AMD EPYC (AVX2) (``benchmarks/fp8_cpu_matmul.py``). A FP8 *checkpoint* is therefore de-quantized once at load into the
  model dtype (the layers stay plain linears with every CPU kernel), and ``--quantization fp8`` on CPU is refused.
  ``INFERNEO_FP8_CPU_EMULATION=1`` instead runs the FP8 math in PyTorch (:meth:`Fp8LinearMethod.reference`: the
  activations quantized as on the GPU, e4m3 products in float32), which the tests use.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from inferneo import envs
from inferneo.kernel_config import KernelConfig
from inferneo.kernels.scaled_row import RowScale, ScaledRow
from inferneo.quantization.base import (
    LinearMethod,
    LinearShape,
    QuantConfig,
    QuantizedLinear,
    new_parameter,
    per_shard_loader,
    row_shard_loader,
)
from inferneo.quantization.fp8_math import (
    FP8_DTYPE,
    dequantize,
    quantize_blocks,
    quantize_groups,
    quantize_per_tensor,
    quantize_with_scale,
)
from inferneo.quantization.layer_names import checkpoint_module_names, layer_listed
from inferneo.quantization.parallel import Axis

logger = logging.getLogger(__name__)

WeightGranularity = Literal["tensor", "channel", "block"]
ActivationScheme = Literal["dynamic_token", "dynamic_tensor", "static_tensor"]
# Smallest CUDA compute capability with FP8 tensor cores (Ada Lovelace); Hopper is 9.0.
MIN_FP8_CAPABILITY = (8, 9)
# ``torch._scaled_mm`` needs the inner and output dimensions to be multiples of 16.
_SCALED_MM_ALIGN = 16
# Dummy weights: the runner's full-precision dummy weights are uniform in +-0.02; a static activation scale that
# lets activations up to ~22 through (benchmarks only).
_DUMMY_WEIGHT_RANGE = 0.02
_DUMMY_INPUT_SCALE = 0.05


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    """How a layer's FP8 weight is scaled and its activations quantized.

    ``weight``: ``tensor`` (one scale per checkpoint tensor), ``channel`` (per output row) or ``block`` (per
    ``block = (rows, cols)`` tile; activations then take one scale per token and ``block[1]`` columns, whatever
    ``activation`` says, which must be ``dynamic_token``). ``activation``: ``dynamic_token``, ``dynamic_tensor`` or
    ``static_tensor`` (the checkpoint's ``input_scale``). ``checkpoint`` False: the weights arrive in full precision
    and are quantized at finalize (``--quantization fp8``: per-channel only).
    """

    weight: WeightGranularity
    block: tuple[int, int] | None
    activation: ActivationScheme
    checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.weight not in ("tensor", "channel", "block"):
            raise ValueError(f"fp8 weight scales must be per tensor, channel or block; got {self.weight!r}")
        if self.activation not in ("dynamic_token", "dynamic_tensor", "static_tensor"):
            raise ValueError(f"fp8 activation scales must be dynamic_token, dynamic_tensor or static_tensor; "
                             f"got {self.activation!r}")
        if (self.weight == "block") != (self.block is not None):
            raise ValueError("fp8: a block size is given with (and only with) block-wise weight scales")
        if self.block is not None and (len(self.block) != 2 or min(self.block) <= 0):
            raise ValueError(f"fp8: the block size must be two positive numbers; got {self.block}")
        if self.weight == "block" and self.activation != "dynamic_token":
            raise ValueError(f"fp8 block-wise weights need dynamic per-token activation scales; got "
                             f"{self.activation} (static activation scales are supported with per-tensor and "
                             f"per-channel weights)")
        if not self.checkpoint and (self.weight != "channel" or self.activation == "static_tensor"):
            raise ValueError("fp8 quantization at load uses per-channel weight scales and dynamic activation scales")


def check_fp8_device(device: torch.device, fmt: str) -> None:
    """Raise ValueError when ``device`` is a GPU without FP8 tensor cores (compute capability below 8.9), naming
    the device and what is supported."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"{fmt} weights need FP8 tensor cores: {name} ({device}) has compute capability "
                         f"{capability[0]}.{capability[1]}; supported: NVIDIA GPUs of compute capability 8.9 or "
                         f"later (Ada Lovelace, Hopper, Blackwell). Use the full-precision model on this GPU, or a "
                         f"4-bit (awq, gptq) checkpoint")


def fp8_dequantized_on(device: torch.device, fmt: str, online: bool) -> bool:
    """Whether a ``fmt`` model on ``device`` runs de-quantized (a checkpoint on CPU: once, at load, into the model
    dtype) rather than as FP8 layers; raises ValueError for what the device cannot run (an FP8 GPU below 8.9,
    ``--quantization fp8`` on CPU, other devices)."""
    check_fp8_device(device, fmt)
    if device.type == "cuda":
        return False
    if device.type != "cpu":
        raise ValueError(f"{fmt} weights are not supported on {device}; supported: CUDA (compute capability >= 8.9) "
                         f"and CPU (checkpoints de-quantized at load)")
    if envs.fp8_cpu_emulation():
        logger.warning("%s: INFERNEO_FP8_CPU_EMULATION=1: FP8 math emulated in PyTorch on CPU (slow; for tests)",
                       fmt)
        return False
    if online:
        raise ValueError(f"--quantization {fmt} is not supported on CPU ({device}): this CPU has no FP8 "
                         f"arithmetic and FP8 matmuls measured several times slower than float32 and bfloat16 "
                         f"here; supported: fp8 on CUDA GPUs of compute capability >= 8.9. On CPU run the model in "
                         f"bfloat16/float32, or load a GGUF or 4-bit checkpoint")
    logger.info("%s checkpoint on CPU: de-quantizing the FP8 weights once at load into the model dtype (this CPU "
                "has no FP8 arithmetic; FP8 matmuls measured slower than float32 here)", fmt)
    return True


def gemv_wanted(kernel: str, kernels: KernelConfig, dtype: torch.dtype) -> bool:
    """Whether a FP8 layer finalized with GPU ``kernel`` (``scaled_mm`` or ``triton_block``; ``reference`` is the
    PyTorch path) runs inputs of a few rows through the weight-only GEMV: the ``fp8_gemv`` switch is on and the
    model computes in bf16/fp16."""
    return kernel != "reference" and kernels.fp8_gemv and dtype in (torch.bfloat16, torch.float16)


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


class Fp8LinearMethod(LinearMethod):
    """A linear layer with an e4m3 weight and float32 scales (:class:`Fp8Scheme`).

    The checkpoint's tensors are registered under its names: ``weight`` (e4m3 ``[out, in]``), the weight scale
    under ``weight_scale_name`` (``weight_scale``; block-wise ``fp8`` checkpoints call it ``weight_scale_inv``),
    and ``input_scale`` for static activation scales. After :meth:`finalize` the weight scale is a scalar, one per
    output row ``[out]``, or the block grid; ``input_scale`` a scalar.
    """

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme, weight_scale_name: str = "weight_scale") -> None:
        self.scheme = scheme
        self.weight_scale_name = weight_scale_name

    # ---- weights -----------------------------------------------------------------------------------------------

    def create_weights(self, layer: QuantizedLinear) -> None:
        shape, scheme = layer.shape, self.scheme
        out_f, in_f = layer.out_features, layer.in_features
        shards = len(shape.output_sizes)
        if not scheme.checkpoint:  # full-precision weights, quantized at finalize
            new_parameter(layer, "weight", (out_f, in_f), layer.dtype, row_shard_loader(shape, dim=0),
                          cols=Axis(1))
            return
        new_parameter(layer, "weight", (out_f, in_f), FP8_DTYPE, row_shard_loader(shape, dim=0), cols=Axis(1))
        if scheme.weight == "tensor":
            new_parameter(layer, self.weight_scale_name, (shards,), torch.float32, per_shard_loader(shape), fill=1)
        elif scheme.weight == "channel":
            new_parameter(layer, self.weight_scale_name, (out_f, 1), torch.float32, row_shard_loader(shape, dim=0),
                          fill=1)
        else:
            rows, cols = scheme.block
            grid = (-(-out_f // rows), -(-in_f // cols))
            new_parameter(layer, self.weight_scale_name, grid, torch.float32,
                          row_shard_loader(shape, dim=0, per_row=(1, rows)), fill=1, cols=Axis(1, 1, cols))
        if scheme.activation == "static_tensor":
            new_parameter(layer, "input_scale", (shards,), torch.float32, per_shard_loader(shape), fill=1)

    def finalize(self, layer: QuantizedLinear, kernels: KernelConfig) -> None:
        """Quantize full-precision weights (online), turn per-shard scales into a scalar or per-row scales, take a
        fused layer's largest input scale, and choose the kernel for ``layer.device``."""
        scheme = self.scheme
        if not scheme.checkpoint:
            q, scales = quantize_groups(layer.weight.data)  # one scale per output row
            _replace(layer, "weight", q)
            _replace(layer, self.weight_scale_name, scales.reshape(-1))
        elif scheme.weight != "block":
            scale = getattr(layer, self.weight_scale_name).data
            _replace(layer, self.weight_scale_name, self._row_scales(layer, scale).reshape(-1)
                     if scale.numel() > 1 else scale.reshape(()))
        if scheme.activation == "static_tensor":
            _replace(layer, "input_scale", layer.input_scale.data.amax().reshape(()))
        layer.fp8_kernel = self._kernel_for(layer)
        # A few rows (batch-1 decode steps) take the weight-only GEMV (see :meth:`takes_gemv`).
        layer.fp8_gemv = gemv_wanted(layer.fp8_kernel, kernels, layer.dtype)
        layer.fp8_pdl = kernels.pdl_on(layer.device)
        if layer.fp8_kernel == "scaled_mm" and scheme.activation == "dynamic_token":
            # Per-token activation scales run the row-wise GEMM, which takes one weight scale per output row.
            scale = getattr(layer, self.weight_scale_name).data
            if scale.numel() == 1:
                _replace(layer, self.weight_scale_name, scale.reshape(1).expand(layer.out_features).contiguous())

    def _kernel_for(self, layer: QuantizedLinear) -> str:
        if layer.device.type != "cuda":
            return "reference"
        if self.scheme.weight == "block":
            return "triton_block"
        if layer.in_features % _SCALED_MM_ALIGN or layer.out_features % _SCALED_MM_ALIGN:
            logger.warning("fp8: %s (%d x %d) does not fit torch._scaled_mm's multiples of %d; it runs the "
                           "reference path", layer.shape.prefix, layer.out_features, layer.in_features,
                           _SCALED_MM_ALIGN)
            return "reference"
        return "scaled_mm"

    def _row_scales(self, layer: QuantizedLinear, scale: torch.Tensor) -> torch.Tensor:
        """Non-block weight scales as a scalar or one per output row ``[out, 1]`` (from a scalar, one per shard,
        or one per row)."""
        if scale.numel() == 1:
            return scale.reshape(())
        if scale.numel() == layer.out_features:
            return scale.reshape(-1, 1)
        sizes = torch.tensor(layer.shape.output_sizes, device=scale.device)
        return scale.reshape(-1).repeat_interleave(sizes).reshape(-1, 1)

    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        weight = layer.weight.data
        if weight.dtype != FP8_DTYPE:  # --quantization fp8 before finalize: still the full-precision weight
            return weight.float()
        scale = getattr(layer, self.weight_scale_name).data
        if self.scheme.weight == "block":
            return dequantize(weight, scale, self.scheme.block)
        return dequantize(weight, self._row_scales(layer, scale))

    def init_dummy(self, layer: QuantizedLinear, generator: torch.Generator) -> None:
        """Random weights uniform in +-0.02 (as the runner's full-precision dummy weights), quantized with the
        scheme's scales; static input scales of 0.05."""
        weight = torch.empty(layer.out_features, layer.in_features, device=layer.device)
        weight.uniform_(-_DUMMY_WEIGHT_RANGE, _DUMMY_WEIGHT_RANGE, generator=generator)
        scheme = self.scheme
        if not scheme.checkpoint:
            layer.weight.data.copy_(weight)
            return
        scale_param = getattr(layer, self.weight_scale_name).data
        if scheme.weight == "block":
            q, scales = quantize_blocks(weight, scheme.block)
        elif scheme.weight == "channel":
            q, scales = quantize_groups(weight)
        else:  # one scale per logical shard
            parts = [quantize_per_tensor(part) for part in weight.split(list(layer.shape.output_sizes))]
            q = torch.cat([p for p, _ in parts])
            scales = torch.stack([s for _, s in parts])
        layer.weight.data.copy_(q)
        scale_param.copy_(scales.reshape(scale_param.shape))
        if scheme.activation == "static_tensor":
            layer.input_scale.data.fill_(_DUMMY_INPUT_SCALE)

    # ---- compute -----------------------------------------------------------------------------------------------

    def takes_gemv(self, layer: QuantizedLinear, rows: int) -> bool:
        """Whether ``rows`` input rows run the weight-only GEMV (``kernels/triton_fp8_gemv.py``): the layer was
        finalized on CUDA in half precision with the ``fp8_gemv`` switch on, and ``1 <= rows <= max_rows()``.
        Those rows keep their activations in full precision (more accurate than the W8A8 path larger batches
        take, which rounds them to e4m3); :meth:`reference` follows the same choice."""
        if not getattr(layer, "fp8_gemv", False) or rows < 1:
            return False
        from inferneo.kernels.triton_fp8_gemv import max_rows

        return rows <= max_rows()

    def _gemv_scale(self, layer: QuantizedLinear) -> tuple[torch.Tensor, tuple[int, int] | None]:
        return getattr(layer, self.weight_scale_name), self.scheme.block

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features)
        kernel = getattr(layer, "fp8_kernel", "reference")
        if self.takes_gemv(layer, x2.shape[0]):
            from inferneo.kernels.triton_fp8_gemv import fp8_gemv

            y = fp8_gemv(x2, layer.weight, *self._gemv_scale(layer), pdl=layer.fp8_pdl)
        elif kernel == "scaled_mm":
            y = self._scaled_mm(layer, x2)
        elif kernel == "triton_block":
            from inferneo.kernels.triton_fp8 import block_scaled_mm, quantize_per_token_group

            xq, x_scales = quantize_per_token_group(x2, self.scheme.block[1])
            y = block_scaled_mm(xq, x_scales, layer.weight, getattr(layer, self.weight_scale_name),
                                self.scheme.block, x.dtype)
        else:
            y = self.reference(layer, x2).to(x.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def silu_mul(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of a gated MLP's fused gate/up ``layer`` in one GEMV kernel when ``x``'s rows take
        the GEMV (:meth:`takes_gemv`), else None (the caller projects, then activates)."""
        x2 = x.reshape(-1, layer.in_features)
        block = self.scheme.block
        if layer.bias is not None or not self.takes_gemv(layer, x2.shape[0]) or \
                (block is not None and (layer.out_features // 2) % block[0]):  # a scale block across gate and up
            return None
        from inferneo.kernels.triton_fp8_gemv import fp8_gemv_silu_mul

        y = fp8_gemv_silu_mul(x2, layer.weight, *self._gemv_scale(layer), pdl=layer.fp8_pdl)
        return y.reshape(*x.shape[:-1], layer.out_features // 2)

    def copy_apply(self, layer: QuantizedLinear, x: torch.Tensor, x_half: torch.Tensor,
                   half_out: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor | None:
        """``layer(x)`` (``silu_mul``: a gated MLP's fused gate/up, its activation as :meth:`silu_mul`) for one
        bfloat16 row through the FP8 GEMV, which reads ``x``'s scaled float16 copy ``x_half`` and writes the
        output's to ``half_out`` (``triton_fp8_gemv.scaled_half``; the same bits as without); None where the GEMV
        does not take ``x`` (nothing written: the caller runs the layer)."""
        block = self.scheme.block
        if (x.dim() != 2 or x.shape[0] != 1 or x.dtype != torch.bfloat16 or layer.bias is not None
                or not self.takes_gemv(layer, 1)
                or (silu_mul and block is not None and (layer.out_features // 2) % block[0])):
            return None
        from inferneo.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_silu_mul

        run = fp8_gemv_silu_mul if silu_mul else fp8_gemv
        return run(x, layer.weight, *self._gemv_scale(layer), pdl=layer.fp8_pdl, x_half=x_half, half_out=half_out)

    def norm_epilogue(self) -> bool:
        """Whether dense decoder layers of these linears take their RMSNorms in the one-row GEMVs' epilogues
        (``device_kernels.EpilogueNormLayer``; ``INFERNEO_FP8_NORM_EPILOGUE``)."""
        return envs.fp8_norm_epilogue()

    def half_copies(self) -> bool:
        """Whether the epilogues also write the rows' scaled float16 copies for the readers
        (``INFERNEO_FP8_HALF_COPIES``, read at each call)."""
        return envs.fp8_half_copies()

    def _epilogue_tile(self, layer: QuantizedLinear, x: torch.Tensor, gated: bool = False):
        """The h2 tiling that runs ``layer`` for the one-row ``x`` with an RMSNorm in its epilogue, or None (not
        the GEMV, a bias, block scales, another kernel; see ``triton_fp8_gemv.h2_epilogue_tile``)."""
        if layer.bias is not None or self.scheme.block is not None or not self.takes_gemv(layer, 1):
            return None
        from inferneo.kernels.triton_fp8_gemv import h2_epilogue_tile

        return h2_epilogue_tile(x, layer.weight, self._gemv_scale(layer)[0], None, gated)

    def residual_norm_apply(self, layer: QuantizedLinear, x: torch.Tensor, residual: torch.Tensor,
                            norm_weight: torch.Tensor, eps: float, *, x_half: torch.Tensor | None = None,
                            half: bool = False) -> ScaledRow | None:
        """``residual += layer(x)`` in place for one bfloat16 row, with the RMSNorm after it left to the next FP8
        layer (``triton_fp8_gemv.fp8_residual_norm``): returns the :class:`ScaledRow` that :meth:`scaled_apply`
        reads, or None where the h2 kernel cannot take it (nothing is written; the caller projects, then
        normalizes). ``x_half``: ``x``'s scaled float16 copy (``triton_fp8_gemv.scaled_half``); ``half``: the
        returned row carries its own (``ScaledRow.half``)."""
        tile = self._epilogue_tile(layer, x)
        if tile is None or residual.shape != (1, layer.out_features) or not residual.is_contiguous() \
                or residual.dtype != x.dtype:
            return None
        from inferneo.kernels.triton_fp8_gemv import fp8_residual_norm

        half_out = x.new_empty((1, layer.out_features), dtype=torch.float16) if half else None
        scaled, square_sums = fp8_residual_norm(x, layer.weight, self._gemv_scale(layer)[0], residual, norm_weight,
                                                pdl=layer.fp8_pdl, x_half=x_half, half_out=half_out,
                                                config=(*tile, "h2"))
        return ScaledRow(scaled, square_sums, eps, half_out)

    def scaled_apply(self, layer: QuantizedLinear, row: ScaledRow, silu_mul: bool = False,
                     half_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """``layer(rmsnorm(r))`` from a :class:`ScaledRow` of ``r``, the norm's ``1 / rms`` applied to the
        products in the h2 kernel's epilogue, or None where the kernel cannot take it (the caller normalizes the
        residual, then projects). ``silu_mul``: ``layer`` is a gated MLP's fused gate/up, the activation returned
        (:meth:`silu_mul`'s). The products read ``row.half`` when there is one; ``half_out`` (with ``silu_mul``):
        written with the activation's scaled float16 copy."""
        tile = self._epilogue_tile(layer, row.scaled, silu_mul)
        if tile is None:
            return None
        if half_out is not None and not silu_mul:
            raise ValueError("scaled_apply: half_out goes with silu_mul")
        from inferneo.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_silu_mul

        run = fp8_gemv_silu_mul if silu_mul else fp8_gemv
        return run(row.scaled, layer.weight, self._gemv_scale(layer)[0], config=(*tile, "h2"), pdl=layer.fp8_pdl,
                   x_half=row.half, half_out=half_out, row_scale=RowScale(row.square_sums, row.eps))

    def norm_apply(self, layer: QuantizedLinear, x: torch.Tensor, residual: torch.Tensor | None,
                   norm_weight: torch.Tensor, eps: float, silu_mul: bool = False):
        """The RMSNorm before ``layer`` and the layer in one GEMV kernel for a one-row ``x`` that takes the GEMV
        (``triton_fp8_gemv.fp8_norm_gemv``; ``silu_mul``: ``layer`` is a gated MLP's fused gate/up, SiLU-and-mul
        applied as :meth:`silu_mul` does): ``(output, residual sum)``, the sum None without ``residual``; None where
        it does not apply (the caller runs the norm, then the layer)."""
        block = self.scheme.block
        if (x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous() or layer.bias is not None
                or x.dtype != layer.dtype or (residual is not None and not residual.is_contiguous())
                or not self.takes_gemv(layer, 1)
                or (silu_mul and block is not None and (layer.out_features // 2) % block[0])):
            return None
        from inferneo.kernels.triton_fp8_gemv import NORM_MAX_COLS, fp8_norm_gemv

        if x.shape[1] > NORM_MAX_COLS:
            return None
        return fp8_norm_gemv(x, residual, norm_weight, eps, layer.weight, *self._gemv_scale(layer), gated=silu_mul,
                             pdl=layer.fp8_pdl)

    def quantize_activations(self, layer: QuantizedLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [M, in]`` as e4m3 values and float32 scales in PyTorch ops: ``[M, 1]`` per token, ``[M, in / bk]``
        per token and block column group, or a scalar (per tensor, static)."""
        scheme = self.scheme
        if scheme.weight == "block":
            return quantize_groups(x, scheme.block[1])
        if scheme.activation == "dynamic_token":
            return quantize_groups(x)
        if scheme.activation == "dynamic_tensor":
            return quantize_per_tensor(x)
        scale = layer.input_scale.data.amax().reshape(())  # before finalize: one per shard
        return quantize_with_scale(x, scale), scale

    def reference(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        """The FP8 math in PyTorch, float32 result, for ``x [M, in]``: rows that take the GEMV
        (:meth:`takes_gemv`) multiply ``x`` itself by the de-quantized weight; otherwise ``x`` is quantized as the
        GPU path quantizes it, then ``F.linear`` of the de-quantized activations and weights (the e4m3 products are
        exact in float32; only the float32 summation order differs from the GPU kernels). Used on CPU and by the
        tests."""
        if self.takes_gemv(layer, x.shape[0]):
            return F.linear(x.float(), self.dequantized_weight(layer))
        xq, x_scales = self.quantize_activations(layer, x)
        block = (1, self.scheme.block[1]) if self.scheme.weight == "block" else None
        return F.linear(dequantize(xq, x_scales, block), self.dequantized_weight(layer))

    def _scaled_mm(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        scheme = self.scheme
        if scheme.activation == "dynamic_token":
            from inferneo.kernels.triton_fp8 import quantize_per_token_group

            xq, x_scale = quantize_per_token_group(x)
        else:
            xq, x_scale = self.quantize_activations(layer, x)
        w_scale = getattr(layer, self.weight_scale_name)
        w_t = layer.weight.t()  # [in, out], column-major as _scaled_mm wants its second operand
        if x_scale.numel() == 1 and w_scale.numel() == 1:
            return torch._scaled_mm(xq, w_t, scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        rows = x_scale.reshape(-1, 1).expand(x.shape[0], 1)
        if x.dtype == torch.bfloat16:  # row-wise scaling: per-token activation x per-row weight scales
            return torch._scaled_mm(xq, w_t, scale_a=rows.contiguous(), scale_b=w_scale.reshape(1, -1),
                                    out_dtype=torch.bfloat16)
        # Row-wise scaled output only comes in bfloat16: take the float32 product and scale it here.
        one = _unit_scale(x.device)
        y = torch._scaled_mm(xq, w_t, scale_a=one, scale_b=one, out_dtype=torch.float32)
        return (y * rows * w_scale.reshape(1, -1)).to(x.dtype)


def _replace(layer: QuantizedLinear, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of parameter ``name`` (the old tensor is freed)."""
    param = nn.Parameter(value, requires_grad=False)
    param.quantized = True
    setattr(layer, name, param)


# ---- de-quantizing a checkpoint at load (CPU) ----------------------------------------------------------------------


def dequantize_fp8_weights(weights: Iterable[tuple[str, torch.Tensor]], scale_name: str,
                           block: tuple[int, int] | None,
                           keep: Container[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each e4m3 ``<module>.weight`` replaced by the float32 ``weight * scale``
    (``<module>.<scale_name>``: a scalar, per row ``[out, 1]``, or per ``block`` tile) and its activation scale
    dropped, except for the modules in ``keep`` (checkpoint module names), whose tensors pass unchanged (they load
    into quantized layers). A weight waits for its scale (and the other way round) when the checkpoint stores them
    apart. Logs how many weights it de-quantized."""
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}
    count = 0

    def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        if scale.dim() == 2 and scale.shape[1] > 1:  # a grid of tile scales
            if block is None:
                raise ValueError(f"fp8: a weight scale of shape {tuple(scale.shape)} needs a block size")
            return dequantize(q, scale, block)
        return dequantize(q, scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))

    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if module in keep:
            yield name, tensor
        elif leaf == "input_scale":
            continue
        elif leaf == scale_name:
            if module in waiting_weights:
                yield f"{module}.weight", dequantized(waiting_weights.pop(module), tensor)
            else:
                waiting_scales[module] = tensor
        elif leaf == "weight" and tensor.dtype == FP8_DTYPE:
            if module in waiting_scales:
                yield name, dequantized(tensor, waiting_scales.pop(module))
            else:
                waiting_weights[module] = tensor
        else:
            yield name, tensor
    if waiting_weights:
        raise ValueError(f"fp8 checkpoint: FP8 weights without a {scale_name}: {', '.join(sorted(waiting_weights))}")
    for module, scale in waiting_scales.items():  # another format's scale (a mixed compressed-tensors checkpoint)
        yield f"{module}.{scale_name}", scale
    if count:
        logger.info("fp8: de-quantized %d FP8 weights at load into the model dtype (modules that run unquantized)",
                    count)


# ---- the format ----------------------------------------------------------------------------------------------


class Fp8Config(QuantConfig):
    """FP8 weights: a ``quant_method: fp8`` checkpoint (:meth:`from_hf`) or ``--quantization fp8`` (:meth:`online`).

    ``lm_head`` and the layers the checkpoint lists in ``ignored_layers`` / ``modules_to_not_convert`` stay in the
    model dtype.
    """

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme, ignored: Sequence[str] = (), weight_scale_name: str = "weight_scale"):
        self.scheme = scheme
        self.ignored = tuple(ignored)
        self.weight_scale_name = weight_scale_name
        self.method = Fp8LinearMethod(scheme, weight_scale_name)
        # Set by check_supported: a checkpoint on CPU is de-quantized while loading (no FP8 layers).
        self.dequantize_at_load = False
        # Checkpoint modules that load into FP8 layers (method_for records them); the checkpoint's other FP8 weights
        # (mixture-of-experts experts, which are not linear layers here) are de-quantized at load.
        self.fp8_modules: set[str] = set()

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> Fp8Config:
        """Parse ``quantization_config`` of a ``quant_method: fp8`` checkpoint: ``activation_scheme`` (``dynamic``
        or ``static``), ``weight_block_size`` (``[128, 128]``: block-wise ``weight_scale_inv``; absent: per-tensor
        ``weight_scale``), ``ignored_layers`` / ``modules_to_not_convert``."""
        activation = quantization_config.get("activation_scheme", "dynamic")
        if activation not in ("dynamic", "static"):
            raise ValueError(f"fp8 checkpoint: activation_scheme {activation!r} is not supported; supported: "
                             f"dynamic, static")
        fmt = quantization_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 checkpoint: fmt {fmt!r} is not supported; supported: e4m3")
        ignored = [*(quantization_config.get("ignored_layers") or ()),
                   *(quantization_config.get("modules_to_not_convert") or ())]
        block = quantization_config.get("weight_block_size")
        if block is not None:
            if activation != "dynamic":
                raise ValueError("fp8 checkpoint: block-wise weights (weight_block_size) with static activation "
                                 "scales are not supported; supported with blocks: activation_scheme dynamic")
            if not isinstance(block, list | tuple) or len(block) != 2:
                raise ValueError(f"fp8 checkpoint: weight_block_size must be two numbers; got {block!r}")
            return cls(Fp8Scheme("block", (int(block[0]), int(block[1])), "dynamic_token"), ignored,
                       weight_scale_name="weight_scale_inv")
        act = "static_tensor" if activation == "static" else "dynamic_token"
        return cls(Fp8Scheme("tensor", None, act), ignored)

    @classmethod
    def online(cls) -> Fp8Config:
        """``--quantization fp8``: full-precision weights quantized at load, one scale per output channel, with
        dynamic per-token activation scales."""
        return cls(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))

    def method_for(self, shape: LinearShape) -> LinearMethod | None:
        if self.dequantize_at_load or shape.prefix.startswith("lm_head"):
            return None
        if layer_listed(self, shape, self.ignored, "ignored_layers"):
            return None
        self.fp8_modules.update(checkpoint_module_names(self, shape))
        return self.method

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        self.dequantize_at_load = fp8_dequantized_on(device, self.name, online=not self.scheme.checkpoint)

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """FP8 weights of modules that are not FP8 layers (all of them when de-quantizing at load on CPU; MoE
        experts) become float32; stray input scales of a dynamic-activation checkpoint are dropped."""
        if not self.scheme.checkpoint:
            yield from weights
            return
        if self.scheme.activation != "static_tensor":
            weights = ((n, t) for n, t in weights if not n.endswith(".input_scale"))
        yield from dequantize_fp8_weights(weights, self.weight_scale_name, self.scheme.block, self.fp8_modules)

    def describe(self) -> str:
        scheme = self.scheme
        weight = f"block {scheme.block[0]}x{scheme.block[1]}" if scheme.block else f"per-{scheme.weight}"
        how = "de-quantized at load" if self.dequantize_at_load else f"activations {scheme.activation}"
        return f"fp8 ({'checkpoint' if scheme.checkpoint else 'quantized at load'}, {weight} weights, {how})"
