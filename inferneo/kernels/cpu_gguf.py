"""Native CPU kernels for GGUF block formats (``csrc/gguf_kernels.cpp``), compiled on first use.

Built like ``kernels/cpu.py``'s module (PyTorch's C++ extension tooling, cached under ``TORCH_EXTENSIONS_DIR``),
as its own extension. The AVX2 path is chosen at run time from the CPU's features (portable loops otherwise), so
the build does not target the build machine. If the build fails, GGUF layers fall back to de-quantizing in
PyTorch at each call and a warning says why.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from inferneo.kernels.native_build import extension_name, load_extension, sources_digest

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent.parent / "csrc" / name for name in ("gguf_kernels.cpp", "gguf_packed.cpp")]


@functools.cache
def gguf_source_digest() -> str:
    """A short digest of the GGUF kernels' C++ sources and the headers beside them: part of the key of every measured
    GGUF path choice (``quantization/gguf_dense.py``), so that a changed kernel is timed again."""
    return sources_digest([str(path) for path in _SOURCES])


@functools.cache
def load_gguf_kernels():
    """The compiled module (``gguf_linear``, ``gguf_dequantize``, ``gguf_isa``), or None when it cannot be built
    here (built once per process)."""
    try:
        logger.info("loading native GGUF kernels (the first run on a machine compiles them)")
        sources = [str(path) for path in _SOURCES]
        return load_extension(
            extension_name("inferneo_gguf_kernels", sources),
            sources,
            # no -march: the AVX2 functions carry their own target attribute and are picked at run time;
            # -ffp-contract=off keeps de-quantization to the reference's separate multiply and add; -fopenmp
            # makes at::parallel_for (a header template, compiled here) run on PyTorch's threads: without it
            # every GGUF layer ran on one thread
            extra_cflags=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler, headers, or an unsupported platform
        logger.warning("native GGUF kernels unavailable, GGUF layers de-quantize in PyTorch: %s", exc)
        return None
