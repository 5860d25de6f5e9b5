"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path Triton kernels.

A batch-1 decode step is a chain of about ten short kernels per layer, and between two of them the GPU idles
while the next one is launched and its programs are set up. Launched with PDL, a kernel may start while the one
before it is finishing: it waits (``griddepcontrol.wait``) before it touches anything an earlier kernel writes, and
then lets the kernel after it launch (``griddepcontrol.launch_dependents``), so at most two kernels overlap. Code
before the wait may only read what no kernel writes during inference: the GEMV starts streaming its first weight
tile there. CUDA graphs capture the launches with their programmatic edges.

**Early launch** (``wait_for_previous_kernel(PDL, EARLY=True)``, with ``INFERNEO_CUDA_PDL_EARLY`` on): such a
kernel lets its dependent launch *before* it waits itself, so a chain of them may be resident at once, each
waiting for the one before: a GEMV launched this way streams the weight rows it reads before its wait while the
latency-bound kernels before it (attention, its reduction) still run. ``griddepcontrol.wait`` waits for the
predecessor's completion, which came after that kernel's own wait, so the order of the results is unchanged. What
it costs: code before a kernel's wait may then run before its predecessor's predecessor has finished, so only
kernels whose dependents read nothing before their wait but constant weights take it, and a kernel followed by one
that reads its predecessor's output before waiting (the down experts kernel reads the routing's ids before it
waits for the gate/up kernel) keeps the late launch. The Triton RMSNorm and the KV store take it too
(``INFERNEO_PDL_EARLY_EXTRA``, default on: a GEMV follows the norm, decode attention the store).

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

EARLY_LAUNCH = tl.constexpr(envs.cuda_pdl_early())


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr, EARLY: tl.constexpr = False):
    """Wait until the kernel before this one has finished and its writes are visible, then let the next launch;
    ``EARLY`` (with ``INFERNEO_CUDA_PDL_EARLY``): let the next one launch first, then wait (see the module doc)."""
    if PDL:
        if EARLY and EARLY_LAUNCH:
            gdc_launch_dependents()
            gdc_wait()
        else:
            gdc_wait()
            gdc_launch_dependents()


@triton.jit
def wait_without_trigger(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible; the next kernel launches
    only when this one ends (no ``launch_dependents``): ``triton_int4._tc_kernel``'s default form, which measured
    as fast as the early trigger in the decode step and did not lose where it did (docs/benchmarks.md)."""
    if PDL:
        gdc_wait()


def pdl_for(x: torch.Tensor, pdl: bool | None = None) -> bool:
    """``pdl`` when the caller decided it (the engine's modules do, once); else whether kernels on ``x``'s device
    launch with PDL by default (CUDA, compute capability 9.0+, ``INFERNEO_CUDA_PDL`` on)."""
    if pdl is not None:
        return pdl
    return x.is_cuda and envs.cuda_pdl() and pdl_capable(x.device)


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords for a Triton kernel that takes ``PDL`` (none without it, e.g. under the interpreter)."""
    return {"launch_pdl": True} if pdl else {}


def early_extra_options(kernel: str, pdl: bool) -> dict:
    """``EARLY=True`` for a kernel of ``INFERNEO_PDL_EARLY_EXTRA`` (``norm``, ``store``) launched with PDL while the
    switch names it (read at each launch); none otherwise."""
    return {"EARLY": True} if pdl and kernel in envs.pdl_early_extra() else {}


