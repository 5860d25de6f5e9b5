"""Which CPU linear kernels can run a layer on a given CPU, best guess first; and the CPU's default dtype.

Pure functions of a :class:`~inferneo.kernels.cpu_features.CpuFeatures` record, so they are tested with feature
sets passed in. Where the answer has more than one kernel, the engine measures them on the model's own shapes at
start-up (``inferneo.model_executor.layers.cpu_linear_tune``); the order here is only what it falls back to when
that tune is switched off, and the tie-break. It follows what was measured on the two CPU kinds so far
(docs/benchmarks.md): the native panel kernel beats oneDNN on AMD's AVX-512 and AVX512_BF16 (it overlaps the
weight stream with the arithmetic), oneDNN beats it in bfloat16 on Intel's AMX, whose tile units only oneDNN uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from inferneo.kernels.cpu_features import CpuFeatures


class LinearKernel(str, Enum):
    """A CPU linear kernel, by the name ``INFERNEO_CPU_LINEAR_KERNEL`` and the start-up log use."""

    #: The native panel kernel (``csrc/cpu_kernels.cpp``): float32 on AVX-512, bfloat16 on AVX512_BF16.
    PANEL = "panel"
    #: Float32 panels through ``torch.matmul``: an output head tied to the embedding, held once in panel layout.
    PANEL_MATMUL = "panel-matmul"
    #: oneDNN with the weight packed once at load (a tied head: oneDNN on the shared plain weight); oneDNN
    #: dispatches to AMX, AVX512_BF16 or AVX-512/AVX2 itself.
    ONEDNN = "onednn"
    #: PyTorch's ``F.linear`` on the plain weight (MKL or oneDNN as PyTorch picks): the reference path.
    TORCH = "torch"


#: The values ``INFERNEO_CPU_LINEAR_KERNEL`` accepts: ``auto`` (choose per CPU and shape) or a kernel name.
LINEAR_KERNEL_CHOICES = ("auto", *(kernel.value for kernel in LinearKernel))


@dataclass(frozen=True, slots=True)
class LinearShape:
    """A linear layer as the choice sees it: ``y[rows, out] = x[rows, in] @ W.T``; ``tied`` when ``W`` is shared
    with an embedding (the layer may then only use kernels that keep one copy of it)."""

    out_features: int
    in_features: int
    tied: bool = False

    def __str__(self) -> str:
        return f"{self.out_features}x{self.in_features}" + (" tied" if self.tied else "")


def candidate_kernels(features: CpuFeatures, dtype: torch.dtype, shape: LinearShape, *,
                      native_linear: bool = True) -> list[LinearKernel]:
    """The kernels that can run a ``dtype`` linear of ``shape`` on a CPU with ``features``, best guess first
    (``native_linear=False``: without the native panel kernel). Only float32 and bfloat16 are packed; other
    dtypes get ``[TORCH]``. Whether a kernel was built here (the native module, this PyTorch's oneDNN) is checked
    by the caller."""
    if dtype not in (torch.float32, torch.bfloat16):
        return [LinearKernel.TORCH]
    if dtype == torch.bfloat16 and features.amx_bf16:
        order = [LinearKernel.ONEDNN, LinearKernel.PANEL]  # AMX tiles are oneDNN's alone
    elif dtype == torch.float32 and "avx512f" not in features.flags:
        order = [LinearKernel.ONEDNN, LinearKernel.PANEL]  # AVX2: oneDNN's float32 ran faster from 16 rows
    else:
        order = [LinearKernel.PANEL, LinearKernel.ONEDNN]
    if shape.tied:
        # before oneDNN on the plain (unpacked) weight, which reads it with a poor stride
        order.insert(order.index(LinearKernel.ONEDNN), LinearKernel.PANEL_MATMUL)
    if not native_linear:
        order.remove(LinearKernel.PANEL)
    return [kernel for kernel in order if missing_features(kernel, dtype, features) is None] + [LinearKernel.TORCH]


def missing_features(kernel: LinearKernel, dtype: torch.dtype, features: CpuFeatures) -> str | None:
    """What keeps ``kernel`` from running a ``dtype`` layer on a CPU with ``features`` (named for messages), or
    None when nothing does."""
    if dtype not in (torch.float32, torch.bfloat16):
        return None if kernel is LinearKernel.TORCH else f"float32 or bfloat16 layers (not {dtype})"
    if kernel is LinearKernel.PANEL:
        # an AVX-512 build has the 16-lane kernels (bfloat16 needs AVX512_BF16); any other x86 build the 8-lane
        # AVX2 ones, float32 and bfloat16 widened in registers
        if "avx512f" in features.flags:
            return None if dtype == torch.float32 or "avx512_bf16" in features.flags else "avx512_bf16"
        lacking = [flag for flag in ("avx2", "fma", "f16c") if flag not in features.flags]
        return " and ".join(lacking) or None
    if kernel is LinearKernel.PANEL_MATMUL and dtype != torch.float32:
        return "a float32 layer (panel-matmul has no bfloat16 form)"
    if kernel is LinearKernel.ONEDNN and dtype == torch.bfloat16 and not (
            features.amx_bf16 or features.avx512_core or "avx_ne_convert" in features.flags):
        return "amx_bf16, avx512bw/vl/dq or avx_ne_convert (oneDNN packs bfloat16 weights only with one of them)"
    return None


def cpu_default_dtype(features: CpuFeatures, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """The compute dtype on this CPU when the user asks for none (``dtype="auto"``): a bfloat16 or float16
    checkpoint runs in bfloat16 where the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512_BF16), else in
    float32 (converting every bfloat16 operand costs more than the halved weight stream saves); a float32
    checkpoint, or one that names no dtype, stays float32 (its values may not fit bfloat16's 8-bit mantissa)."""
    if checkpoint_dtype in (torch.bfloat16, torch.float16) and features.native_bf16:
        return torch.bfloat16
    if checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32, None):
        return torch.float32
    return checkpoint_dtype


#: Prompt length from which a fresh prompt's attention runs through PyTorch's SDPA rather than the paged kernel, on
#: CPUs where :func:`prompt_attention_sdpa_min_tokens` says so. Measured on a 2-core Intel Xeon with AMX-BF16
#: (2026-12-05, bfloat16, SmolLM2-135M's heads): with 2,048 prompt tokens of one length a call
#: (``benchmarks/cpu_prefill_step.py``), SDPA took 1.25x the paged kernel's time at 16-token prompts, 0.61x at 64,
#: 0.43x at 256, 0.29x at 2,048; with four prompts of four lengths (four SDPA calls, as prompts of mixed lengths
#: give), 1.33x at 64 tokens, 1.04x at 96, 0.89x at 128, 0.67x at 256, 0.48x at 512: each call's fixed cost decides
#: the short end.
SDPA_PROMPT_MIN_TOKENS = 128


def prompt_attention_sdpa_min_tokens(features: CpuFeatures, dtype: torch.dtype) -> int | None:
    """From how many tokens a prompt with no cached context takes PyTorch's SDPA for its attention on a CPU with
    ``features`` (None: never, every token goes through the paged kernel). Only bfloat16 on AMX-BF16 CPUs: there
    SDPA's flash-attention kernel multiplies on the tiles (through oneDNN's brgemm), where the paged kernel
    scores one query token at a time with vector FMAs; elsewhere the paged kernel measured faster
    (docs/benchmarks.md)."""
    return SDPA_PROMPT_MIN_TOKENS if dtype == torch.bfloat16 and features.amx_bf16 else None
