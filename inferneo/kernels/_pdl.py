"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path Triton kernels.

A batch-1 decode step is a chain of about ten short kernels per layer, and between two of them the GPU idles
while the next one is launched and its programs are set up. Launched with PDL, a kernel may start while the one
before it is finishing: it waits (``griddepcontrol.wait``) before it touches anything an earlier kernel writes, and
then lets the kernel after it launch (``griddepcontrol.launch_dependents``), so at most two kernels overlap. Code
before the wait may only read what no kernel writes during inference: the GEMV starts streaming its first weight
tile there. CUDA graphs capture the launches with their programmatic edges.

``INFERNEO_CUDA_PDL=0`` turns it off.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from inferneo import envs


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible, then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _pdl_on(device_index: int) -> bool:
    """Decided once per device: this is asked at every kernel launch."""
    return envs.cuda_pdl() and torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_for(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device launch with PDL (CUDA, compute capability 9.0+, switch on)."""
    return x.is_cuda and _pdl_on(x.device.index or 0)


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords for a Triton kernel that takes ``PDL`` (none without it, e.g. under the interpreter)."""
    return {"launch_pdl": True} if pdl else {}


