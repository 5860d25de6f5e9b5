"""What this CPU can multiply natively: its model name and the instruction-set flags the CPU kernels care about.

Read once per process from ``/proc/cpuinfo`` (Linux); elsewhere, from PyTorch's own dispatch level
(``torch.backends.cpu.get_cpu_capability()``), which knows AVX2 and AVX-512 but not the bfloat16 or AMX
extensions. The record is plain data, so the kernel choice (``inferneo.kernels.cpu_select``) can be tested with
any feature set passed in.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

#: The flags the CPU kernel choice and the dtype rule read, in the order they are reported (Linux's names).
KNOWN_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx512bw",
               "avx512vl", "avx512dq", "avx512_vnni", "avx_ne_convert", "avx_vnni", "avx2", "fma", "f16c")

# PyTorch's dispatch levels, as the flags they imply (the fallback where /proc/cpuinfo cannot be read).
_CAPABILITY_FLAGS = {
    "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
    "AVX2": ("avx2", "fma", "f16c"),
}


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """A CPU's model name and the subset of its flags in :data:`KNOWN_FLAGS`."""

    model: str
    flags: frozenset[str]

    @classmethod
    def of(cls, model: str, *flags: str) -> CpuFeatures:
        """A record from a model name and flags (unknown flags are dropped), e.g. for tests."""
        return cls(model, frozenset(flag for flag in flags if flag in KNOWN_FLAGS))

    @property
    def amx_bf16(self) -> bool:
        """AMX tile multiplies in bfloat16 (Intel Sapphire Rapids and later)."""
        return "amx_bf16" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        """The AVX512_BF16 dot product (two bfloat16 products summed into each float32 lane)."""
        return "avx512_bf16" in self.flags

    @property
    def avx512f(self) -> bool:
        return "avx512f" in self.flags

    @property
    def avx512_core(self) -> bool:
        """AVX-512 F, BW, VL and DQ: what oneDNN needs to pack bfloat16 weights (besides AMX / AVX-NE-CONVERT)."""
        return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= self.flags

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def fma(self) -> bool:
        return "fma" in self.flags

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU multiplies bfloat16 in hardware (AMX-BF16 or AVX512_BF16): where bfloat16 models run
        faster than float32 rather than converting every operand."""
        return self.amx_bf16 or self.avx512_bf16

    def summary(self) -> str:
        """The known flags present, in :data:`KNOWN_FLAGS` order (``"none"`` when there are none)."""
        return " ".join(flag for flag in KNOWN_FLAGS if flag in self.flags) or "none"


def parse_cpuinfo(text: str) -> CpuFeatures | None:
    """The features in a ``/proc/cpuinfo`` text (its first processor's ``model name`` and ``flags``), or None
    when the text has no flags line (not an x86 Linux kernel)."""
    model, flags = "", None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = value.split()
    if flags is None:
        return None
    return CpuFeatures.of(model or platform.processor() or "unknown CPU", *flags)


def features_from_capability(capability: str, model: str) -> CpuFeatures:
    """The flags PyTorch's CPU dispatch level implies (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...)."""
    return CpuFeatures.of(model, *_CAPABILITY_FLAGS.get(capability, ()))


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (read once per process: the hardware does not change)."""
    try:
        found = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    if found is not None:
        return found
    import torch

    return features_from_capability(torch.backends.cpu.get_cpu_capability(),
                                    platform.processor() or platform.machine() or "unknown CPU")
