"""Which kernels an engine uses: one frozen record per engine, its defaults read from the environment.

Every field is one of the ``INFERNEO_*`` kernel switches (``inferneo.envs``). ``KernelConfig()`` (the same as
:meth:`KernelConfig.from_env`) takes each field from its environment variable at the moment it is built, so a
setting exported before the engine starts still works; a field given by name overrides the environment. The
record travels with the engine (``EngineConfig.kernels``, ``LLM(kernels=KernelConfig(...))``) down to where the
model is built, so two engines in one process can use different kernels. Only whether the hardware and libraries
*can* run a kernel is cached per process (the native CPU build, Triton's import, a GPU's compute capability).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferneo import envs
from inferneo.kernels.cpu_select import LINEAR_KERNEL_CHOICES


@dataclass(frozen=True)
class KernelConfig:
    """The kernel switches of one engine; each defaults to its ``INFERNEO_*`` environment variable."""

    #: ``INFERNEO_CPU_ONEDNN`` (on): pack CPU linear layers once at load (the native panel kernel where it runs,
    #: else oneDNN); off, they run as plain PyTorch matmuls (the reference path).
    cpu_onednn_linear: bool = field(default_factory=envs.cpu_onednn_linear)
    #: ``INFERNEO_CPU_NATIVE_LINEAR`` (on): packed float32/bfloat16 CPU linears go through the native panel
    #: kernel where it runs (AVX-512 builds); off, through oneDNN.
    cpu_native_linear: bool = field(default_factory=envs.cpu_native_linear)
    #: ``INFERNEO_CPU_LINEAR_KERNEL`` (``auto``): which kernel CPU linears use; ``auto`` chooses per CPU and layer
    #: shape at start-up (``cpu_linear_tune``); a kernel's name forces it where it runs (performance-tuning.md).
    cpu_linear_kernel: str = field(default_factory=envs.cpu_linear_kernel)
    #: ``INFERNEO_CPU_LINEAR_TUNE`` (on): with ``auto``, time the candidate CPU linear kernels on the model's
    #: shapes at start-up (cached on disk); off, take the first candidate of the CPU's list.
    cpu_linear_tune: bool = field(default_factory=envs.cpu_linear_tune)
    #: ``INFERNEO_CPU_KERNELS`` (on): on CPU, the native C++ kernels for paged attention, RMSNorm, rotary and
    #: SiLU-and-mul; off, PyTorch code (the reference path).
    cpu_native_kernels: bool = field(default_factory=envs.cpu_native_kernels)
    #: ``INFERNEO_TRITON_OPS`` (on): on CUDA, fused Triton kernels for RMSNorm, SiLU-and-mul and rotary.
    triton_ops: bool = field(default_factory=envs.triton_ops)
    #: ``INFERNEO_TRITON_GEMV`` (on): on CUDA, one-row half-precision linear layers through the Triton GEMV.
    triton_gemv: bool = field(default_factory=envs.triton_gemv)
    #: ``INFERNEO_GEMV_SILU`` (on; with the Triton GEMV): a gated MLP's gate/up projection and its SiLU-and-mul
    #: in one GEMV kernel at one-row decode steps in half precision.
    gemv_silu: bool = field(default_factory=envs.gemv_silu)
    #: ``INFERNEO_FP8_GEMV`` (on): on CUDA, FP8 linear layers take the weight-only FP8 GEMV at a few rows (batch-1
    #: decode steps and the like); off, the W8A8 GEMM at every row count.
    fp8_gemv: bool = field(default_factory=envs.fp8_gemv)
    #: ``INFERNEO_CUDA_PDL`` (on): the decode-path Triton kernels launch with programmatic dependent launch on
    #: compute capability 9.0 and later.
    cuda_pdl: bool = field(default_factory=envs.cuda_pdl)
    #: ``INFERNEO_PEER_ALL_REDUCE`` (on): at tensor-parallel size > 1 on GPUs that reach each other's memory,
    #: small all-reduces through peer memory, the one after each row-parallel layer fused with the RMSNorm after it.
    peer_all_reduce: bool = field(default_factory=envs.peer_all_reduce)
    #: ``INFERNEO_PEER_PUSH`` (on; with the peer all-reduce): in 16-bit precision the fused all-reduce + RMSNorm
    #: pushes this rank's rows into the peers' receive buffers instead of a flag barrier and reads.
    peer_push: bool = field(default_factory=envs.peer_push)
    #: ``INFERNEO_CUDA_FUSED_QK_NORM_ROPE`` (on; with ``triton_ops``): on CUDA, attention layers with per-head q/k
    #: RMSNorms normalize and rotate queries and keys in one Triton kernel in place on the fused projection output.
    cuda_fused_qk_norm_rope: bool = field(default_factory=envs.cuda_fused_qk_norm_rope)
    #: ``INFERNEO_CUDA_FUSED_ROUTING`` (on; with ``triton_ops``): on CUDA, the softmax top-k mixture-of-experts
    #: routers (and gpt-oss's top-k-then-softmax) as one Triton kernel; DeepSeek's grouped routers stay PyTorch.
    cuda_fused_routing: bool = field(default_factory=envs.cuda_fused_routing)
    #: ``INFERNEO_GGUF_INT8_DOT`` (off): on, Q4_0/Q4_1/Q8_0 GGUF layers on AVX2 CPUs quantize their activations to
    #: int8 per 32-weight block and use integer dot products where that measured faster (with AVX512_VNNI the Q4
    #: layers in the wide16 layout; not bit-exact); off, the exact float path.
    gguf_int8_dot: bool = field(default_factory=envs.gguf_int8_dot)
    #: ``INFERNEO_GGUF_WIDE16`` (on): on AVX-512 CPUs, Q4_0/Q4_1 GGUF layers are repacked at load into the wide16
    #: layout that the AVX-512 kernels read without transposing (same bytes, same values; the int8 path keeps the
    #: file's layout unless the CPU has AVX512_VNNI); off, they stay in the file's block layout.
    gguf_wide16: bool = field(default_factory=envs.gguf_wide16)
    #: ``INFERNEO_GGUF_INT16`` (on): on CPUs with AVX512_VNNI, wide16 GGUF layers multiply float32 activations from
    #: 16 rows up as 16-bit integers per 32-weight block (within 2^-16 of each block's largest magnitude; 1.1-1.4x
    #: the exact float32 path at 16-256 rows); off, the exact float32 path.
    gguf_int16: bool = field(default_factory=envs.gguf_int16)

    def __post_init__(self) -> None:
        if self.cpu_linear_kernel not in LINEAR_KERNEL_CHOICES:
            raise ValueError(f"KernelConfig.cpu_linear_kernel (INFERNEO_CPU_LINEAR_KERNEL) must be one of "
                             f"{', '.join(LINEAR_KERNEL_CHOICES)}; got {self.cpu_linear_kernel!r}")
        for name in self.__dataclass_fields__:
            if name != "cpu_linear_kernel" and not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelConfig.{name} must be True or False; got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls) -> KernelConfig:
        """Every switch from its environment variable (read now)."""
        return cls()

    def pdl_on(self, device: torch.device) -> bool:
        """Whether decode-path Triton kernels on ``device`` launch with programmatic dependent launch: the switch
        is on and the device is a CUDA GPU of compute capability 9.0 or later."""
        return self.cuda_pdl and pdl_capable(device)


_capabilities: dict[int, tuple[int, int]] = {}


def pdl_capable(device: torch.device) -> bool:
    """Whether ``device`` can launch kernels with programmatic dependent launch (a CUDA GPU of compute
    capability 9.0 or later); the capability is asked once per GPU (the hardware does not change)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index] >= (9, 0)
