"""The CPU backend: the reference backend with decode attention done by a native paged kernel.

The kernel reads keys and values in place through the block tables (no gather copy) and keeps its softmax in
float32. Prefill spans still go through the reference path.
"""

from __future__ import annotations

from inferneo.attention.torch_ref import TorchReferenceBackend
from inferneo.kernels.cpu import load_cpu_kernels


class CpuNativeBackend(TorchReferenceBackend):
    name = "cpu"
    needs_decode_mask = False

    def __init__(self) -> None:
        self.kernels = load_cpu_kernels()
        if self.kernels is None:
            raise RuntimeError("the native CPU kernels could not be loaded")

    def decode_attention(self, q, kv_cache, metadata, scale):
        return self.kernels.paged_decode_attention(
            q.contiguous(), kv_cache[0], kv_cache[1], metadata.decode_block_tables, metadata.decode_seq_lens, scale
        )
