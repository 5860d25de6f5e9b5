"""The Triton routing kernel against the PyTorch routers, and the device transform's choice of it, run on CPU under
Triton's interpreter in a subprocess (the interpreter must be on before triton is imported)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_KERNEL_SCRIPT = textwrap.dedent("""
    import torch
    from inferneo.kernels.triton_routing import RENORMALIZES, route_topk
    from inferneo.model_executor.layers.moe_routing import make_router

    torch.manual_seed(0)
    checked = 0
    for num_experts in (8, 32, 128):
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 3, 5):
                # distinct logits (steps of 1/8 are exact in bfloat16 at these sizes), so the order is unique
                logits = torch.stack([torch.randperm(num_experts) for _ in range(tokens)]).float() / 8
                logits = (logits - num_experts / 16).to(dtype)
                for top_k in (1, 2, 4, 8):
                    if top_k > num_experts:
                        continue
                    for routing, renormalize in RENORMALIZES.items():
                        want = make_router(routing, top_k)(logits)
                        got = route_topk(logits, top_k, renormalize=renormalize)
                        assert got.weights.dtype == torch.float32 and got.ids.dtype == want.ids.dtype
                        assert torch.equal(got.ids, want.ids), (routing, num_experts, top_k, got.ids, want.ids)
                        torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
                        checked += 1
    assert checked == 3 * 2 * 3 * 4 * 3, checked  # experts x dtypes x tokens x k x routers
    # a strided view of the logits (a column slice) and no tokens at all
    wide = torch.randn(3, 40)
    got, want = route_topk(wide[:, :32], 4, renormalize=True), make_router("softmax_topk_renormalized", 4)(wide[:, :32])
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights)
    assert route_topk(torch.randn(0, 8), 2, renormalize=False).ids.shape == (0, 2)
    print("ok")
""")


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_routing_kernel_matches_the_pytorch_routers():
    _run(_KERNEL_SCRIPT)


# The device transform for a CUDA model (on CPU tensors under the interpreter): the plain routers become the
# kernel's, DeepSeek-style routers stay, and the switch turns it off.
_TRANSFORM_SCRIPT = textwrap.dedent("""
    import functools, sys, torch
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels.triton_routing import TritonRouter
    from inferneo.model_executor.device_kernels import use_device_kernels
    from inferneo.model_executor.layers.moe import FusedMoE
    from inferneo.model_executor.layers.moe_routing import make_router, softmax_grouped_topk

    fused = sys.argv[1] == "fused"
    grouped = functools.partial(softmax_grouped_topk, top_k=2)
    model = torch.nn.Sequential(FusedMoE(8, 4, 8, 2, make_router("softmax_topk_renormalized", 2)),
                                FusedMoE(8, 4, 8, 3, make_router("topk_softmax", 3)),
                                FusedMoE(8, 4, 8, 2, grouped))
    plain = [layer.router for layer in model]
    use_device_kernels(model, torch.device("cuda"), KernelConfig(cuda_pdl=False, cuda_fused_routing=fused))
    assert model[2].router is grouped
    for layer, before in zip(model[:2], plain):
        assert isinstance(layer.router, TritonRouter) == fused, layer.router
        logits = torch.randn(3, 8)
        got, want = layer.router(logits), before(logits)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.weights, want.weights)
    print("ok")
""")


@pytest.mark.parametrize("routing", ["fused", "plain"])
def test_cuda_transform_swaps_only_the_plain_routers(routing):
    _run(_TRANSFORM_SCRIPT, routing)


# Whole tiny mixture-of-experts models through the CUDA transform (under the interpreter): the routing kernel, the
# fused q/k norm + rotary (Qwen3-MoE) and the Triton experts together keep the PyTorch model's logits.
_MODEL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels.triton_routing import TritonRouter
    from inferneo.model_executor.device_kernels import use_device_kernels
    from inferneo.model_executor.layers.moe import FusedMoE
    from inferneo.testing.tiny_models import make_tiny_checkpoint
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from test_tensor_parallel_layers import _build, _forward_logits
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()  # the experts kernels need it

    for arch in ("qwen3_moe", "gpt_oss"):
        model, config = _build(make_tiny_checkpoint(sys.argv[1] + "/" + arch, arch, num_heads=4, num_kv_heads=2))
        expected = _forward_logits(model, config.num_kv_heads, config.head_dim)
        counts = use_device_kernels(model, torch.device("cuda"), KernelConfig(cuda_pdl=False))
        layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        assert layers and all(isinstance(m.router, TritonRouter) for m in layers), [m.router for m in layers]
        assert counts["QKNormRotaryAttention"] == (config.num_layers if arch == "qwen3_moe" else 0), counts
        got = _forward_logits(model, config.num_kv_heads, config.head_dim)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    print("ok")
""")


def test_cuda_transform_keeps_the_logits_of_tiny_moe_models(tmp_path):
    _run(_MODEL_SCRIPT, str(tmp_path), os.path.dirname(__file__))
