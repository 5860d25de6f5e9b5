"""The native CPU kernel for 4-bit weight-only linear layers (``inferneo/csrc/int4_kernels.cpp``), compiled on
first use with PyTorch's C++ extension tooling into its own module (cached under ``TORCH_EXTENSIONS_DIR``).

If the build fails, :func:`int4_cpu_kernels` answers None and the layers use the PyTorch reference (a warning says
why). The kernel picks its instruction set at run time (AVX2 + FMA, else portable loops).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.native_build import extension_name, load_extension
from inferneo.quantization.int4_layouts import Int4Weights

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent.parent / "csrc" / "int4_kernels.cpp"


def int4_cpu_kernels(kernels: KernelConfig | None = None):
    """The native module when the engine's ``cpu_native_kernels`` switch is on (``kernels``; None: the
    environment's) and it builds here, else None."""
    kernels = kernels or KernelConfig.from_env()
    return load_int4_cpu_kernels() if kernels.cpu_native_kernels else None


@functools.cache
def load_int4_cpu_kernels():
    """The compiled module, or None when it cannot be built here (built once per process)."""
    try:
        logger.info("loading the native int4 CPU kernel (the first run on a machine compiles it)")
        return load_extension(
            extension_name("inferneo_int4_kernels", [str(_SOURCE)]),
            [str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler, headers, or an unsupported platform
        logger.warning("native int4 CPU kernel unavailable, using the PyTorch reference: %s", exc)
        return None


def cpu_int4_linear(x: torch.Tensor, weights: Int4Weights, isa: str = "auto") -> torch.Tensor:
    """``x [M, K] @ W.T`` with the native kernel (``x`` float32 or bfloat16; columns already in ``weights``'s
    sorted order); ``isa`` forces ``"avx2"`` or ``"scalar"`` (tests)."""
    module = load_int4_cpu_kernels()
    if module is None:
        raise RuntimeError("the native int4 CPU kernel did not build")
    return module.int4_linear(x, weights.packed, weights.scales, weights.zeros, weights.group_size, isa)
