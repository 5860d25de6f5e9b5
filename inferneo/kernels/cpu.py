"""Native CPU kernels, compiled on first use with PyTorch's C++ extension tooling.

The build needs a C++ compiler and the Python headers (present wherever ``pip install`` can build wheels). It is
cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so only the first start pays for it.
If the build fails, callers fall back to the pure-PyTorch path and a warning says why.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.native_build import load_extension

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent.parent / "csrc" / "cpu_kernels.cpp"


def cpu_kernels(kernels: KernelConfig | None = None):
    """The native module when the engine's ``cpu_native_kernels`` switch is on (``kernels``; None: the
    environment's) and the kernels build here, else None."""
    kernels = kernels or KernelConfig.from_env()
    return load_cpu_kernels() if kernels.cpu_native_kernels else None


@functools.cache
def load_cpu_kernels():
    """The compiled module, or None when it cannot be built here (built once per process, whatever any engine's
    switches say: callers ask :func:`cpu_kernels`, which applies the switch)."""
    try:
        logger.info("loading native CPU kernels (the first run on a machine compiles them: about half a minute)")
        return load_extension(
            "inferneo_cpu_kernels",
            [str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                          "-fassociative-math", "-fno-signed-zeros"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler, headers, or an unsupported platform
        logger.warning("native CPU kernels unavailable, using the PyTorch path: %s", exc)
        return None
