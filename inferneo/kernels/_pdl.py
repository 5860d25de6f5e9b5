"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path Triton kernels.

A batch-1 decode step is a chain of about ten short kernels per layer, and between two of them the GPU idles
while the next one is launched and its programs are set up. Launched with PDL, a kernel may start while the one
before it is finishing: it waits (``griddepcontrol.wait``) before it touches anything an earlier kernel writes, and
then lets the kernel after it launch (``griddepcontrol.launch_dependents``), so at most two kernels overlap. Code
before the wait may only read what no kernel writes during inference: the GEMV starts streaming its first weight
tile there. CUDA graphs capture the launches with their programmatic edges.

Whether a launch uses PDL is decided where the model is built (``KernelConfig.pdl_on``, from the engine's
``cuda_pdl`` switch and the GPU) and handed to each launcher as ``pdl``; a launcher called without it (a benchmark,
a test) decides from the tensor and ``INFERNEO_CUDA_PDL``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from inferneo import envs
from inferneo.kernel_config import pdl_capable


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible, then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_for(x: torch.Tensor, pdl: bool | None = None) -> bool:
    """``pdl`` when the caller decided it (the engine's modules do, once); else whether kernels on ``x``'s device
    launch with PDL by default (CUDA, compute capability 9.0+, ``INFERNEO_CUDA_PDL`` on)."""
    if pdl is not None:
        return pdl
    return x.is_cuda and envs.cuda_pdl() and pdl_capable(x.device)


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords for a Triton kernel that takes ``PDL`` (none without it, e.g. under the interpreter)."""
    return {"launch_pdl": True} if pdl else {}


