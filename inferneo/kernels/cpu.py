"""Native CPU kernels, compiled on first use with PyTorch's C++ extension tooling.

The build needs a C++ compiler and the Python headers (present wherever ``pip install`` can build wheels). It is
cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so only the first start pays for it.
If the build fails, callers fall back to the pure-PyTorch path and a warning says why.

The module is compiled for the CPU it is built on (``-march=native``: AVX-512, or AVX2 + FMA + F16C, vector paths;
``vector_isa()`` says which). PyTorch's extension cache keys a build by its name, sources and flags only, so the
name carries a digest of the CPU's model and flags (:func:`cpu_build_tag`): a cache folder shared between machines
(a home directory on NFS, a container image built elsewhere) never hands one CPU a module built for another, whose
instructions it may lack.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.native_build import extension_name, load_extension, sources_digest

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
            cpu_extension_name(),
            [str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                          "-fassociative-math", "-fno-signed-zeros"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler, headers, or an unsupported platform
        logger.warning("native CPU kernels unavailable, using the PyTorch path: %s", exc)
        return None


def argmax_rows_for(device, kernels: KernelConfig | None = None):
    """The sampler's argmax for ``device`` (``[B, V]`` → ``[B]`` int64, torch.argmax's choice: the lowest index
    among ties, a NaN before any number): on the CPU with the native kernels, their ``argmax_rows`` for contiguous
    float32 rows (about 7x torch's on a batch of logits) and ``torch.argmax`` for anything else; elsewhere None
    (the sampler's default, ``torch.argmax``)."""
    import torch

    native = cpu_kernels(kernels) if torch.device(device).type == "cpu" else None
    if native is None:
        return None

    def argmax_rows(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1 and x.device.type == "cpu":
            return native.argmax_rows(x)
        return x.argmax(dim=-1)

    return argmax_rows


def cpu_extension_name() -> str:
    """The native kernels' extension name: this CPU's build tag (``-march=native``) and where the source lies."""
    return extension_name(f"inferneo_cpu_kernels_{cpu_build_tag()}", [str(_SOURCE)])


@functools.cache
def native_source_digest() -> str:
    """A short digest of the native kernels' C++ source (``csrc/cpu_kernels.cpp``) and the headers beside it: part
    of the key of every measured kernel choice, so that a changed kernel is timed again rather than judged by its
    old figures."""
    return sources_digest([str(_SOURCE)])


@functools.cache
def cpu_build_tag() -> str:
    """A short digest of this CPU's model and instruction-set flags (``/proc/cpuinfo``'s first processor; elsewhere
    the platform's processor name and PyTorch's CPU dispatch level): equal on two machines only when a module
    compiled with ``-march=native`` on one runs on the other."""
    identity = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if "flags" in fields:
        identity = " ".join((fields.get("model name", ""), fields.get("cpu family", ""), fields.get("model", ""),
                             *sorted(fields["flags"].split())))
    else:
        import torch

        identity = " ".join((platform.machine(), platform.processor(), torch.backends.cpu.get_cpu_capability()))
    return hashlib.sha256(identity.encode()).hexdigest()[:12]
