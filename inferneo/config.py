"""Engine configuration: one validated record built from user arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferneo.kernel_config import KernelConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}
SCHEDULING_POLICIES = ("fcfs", "priority")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine core needs to know, checked once at start-up.

    ``kv_cache_memory`` is the number of bytes given to the paged KV cache; on CUDA, when it is None, the cache
    takes ``gpu_memory_utilization`` of the device memory minus what the model needs.
    """

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    max_queued_requests: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    num_threads: int | None = None
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None  # None: on for CUDA (any tensor-parallel size), off on CPU
    kernels: KernelConfig = field(default_factory=KernelConfig.from_env)  # kernel switches; default: INFERNEO_*

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available on this machine")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; got {self.scheduling_policy!r}"
            )
        _positive("block_size", self.block_size)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("max_num_seqs", self.max_num_seqs)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if self.max_queued_requests is not None:
            _positive("max_queued_requests", self.max_queued_requests)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype: the one asked for, or for ``auto`` the checkpoint's (fp32 on CPU for fp16)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        dtype = checkpoint_dtype or torch.float32
        if self.torch_device.type == "cpu" and dtype == torch.float16:
            return torch.float32
        return dtype


def parse_memory_size(value: str | int | None) -> int | None:
    """Bytes from ``4GiB``, ``512MiB``, ``2G``, ``1e9`` or a plain integer."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    suffix = next((u for u in units if text.endswith(u)), "")
    number, scale = (text[: -len(suffix)], units[suffix]) if suffix else (text, 1)
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {value!r}; use e.g. 4GiB or 512MiB") from None
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
