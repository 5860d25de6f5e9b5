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
    # ties: equal logits go to the lower id first
    for num_experts in (8, 60, 128):
        logits = torch.randn(3, num_experts)
        logits[:, [5, 1, num_experts - 1]] = logits.max() + 1.0
        logits[1, [0, 2]] = logits[1, 5].item()
        for top_k in (2, 4, 6):
            got = route_topk(logits, top_k, renormalize=True)
            want = make_router("softmax_topk_renormalized", top_k)(logits)
            stable = torch.sort(-logits, dim=-1, stable=True).indices[:, :top_k]  # equal logits: lower id first
            assert torch.equal(got.ids, stable), (got.ids, stable)
            torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    print("ok")
""")

# norm_gemv storing the normed row (the router GEMV of a mixture-of-experts layer at one token): the normed row and
# residual sum equal the RMSNorm kernel's, the product that of the call without it.
_NORM_GEMV_SCRIPT = textwrap.dedent("""
    import torch
    from inferneo.kernels import triton_gemv
    from inferneo.kernels._triton_elementwise import rms_norm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (False, True):
            x, res = torch.randn(1, 48).to(dtype), torch.randn(1, 48).to(dtype)
            norm_w, w = (torch.rand(48) + 0.5).to(dtype), torch.randn(20, 48).to(dtype)
            b = torch.randn(20).to(dtype) if bias else None
            prod, total, normed = triton_gemv.norm_gemv(x, res, norm_w, 1e-6, w, b, store_normed=True)
            prod2, total2 = triton_gemv.norm_gemv(x, res, norm_w, 1e-6, w, b)
            assert torch.equal(prod, prod2) and torch.equal(total, total2)
            want_normed, want_total = rms_norm(x.clone(), res.clone(), norm_w, 1e-6)
            tol = 0 if dtype == torch.float32 else 1e-2  # (the interpreter's bfloat16 rounding, see below)
            torch.testing.assert_close(normed, want_normed, rtol=tol, atol=tol)
            torch.testing.assert_close(total, want_total, rtol=tol, atol=tol)
    print("ok")
""")


def test_norm_gemv_stores_the_normed_row():
    _run(_NORM_GEMV_SCRIPT)


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


# The post-attention RMSNorm + router linear + top-k kernel against the PyTorch modules: the residual sum exactly,
# the norm to rounding, the experts of the logits computed from its normed rows; inputs untouched, and the tickets
# back at zero so that a second call (a CUDA-graph replay) gives the same result.
_NORM_ROUTE_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from inferneo.kernels.triton_routing import RENORMALIZES, norm_route_topk
    from inferneo.model_executor.layers.basic import RMSNorm
    from inferneo.model_executor.layers.moe_routing import make_router

    torch.manual_seed(0)
    checked = 0
    # (hidden, experts, top_k, router rows per program: None the default, 64 one program for all)
    shapes = [(48, 8, 2, None), (256, 32, 4, 4), (256, 128, 8, None), (64, 40, 3, 16), (64, 8, 1, 64)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.03)):
        for shape, (hidden, n_experts, top_k, rows) in enumerate(shapes):
            for tokens in ((1, 4) if shape < 2 else (shape - 1,)):
                for (routing, renormalize), bias in zip(RENORMALIZES.items(), (False, True, True), strict=True):
                    norm = RMSNorm(hidden, 1e-6).to(dtype)
                    norm.weight.data = (torch.rand(hidden) + 0.5).to(dtype)
                    gate = torch.nn.Linear(hidden, n_experts, bias=bias).to(dtype)
                    x, res = torch.randn(tokens, hidden).to(dtype), torch.randn(tokens, hidden).to(dtype)
                    x0, res0 = x.clone(), res.clone()
                    tickets = torch.zeros(4, dtype=torch.int32)
                    args = (x, res, norm.weight, norm.eps, gate.weight, gate.bias, tickets, top_k)
                    normed, total, routed = norm_route_topk(*args, renormalize=renormalize, rows=rows)
                    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs are not written"
                    assert not tickets.any(), tickets
                    want_normed, want_total = norm(x0, res0)
                    # (bfloat16: the interpreter's float32 -> bfloat16 conversion is not PyTorch's round-to-nearest,
                    # so sums and logits may differ by one unit in the last place; on a GPU they round alike)
                    torch.testing.assert_close(total, want_total, rtol=tol, atol=tol)
                    torch.testing.assert_close(normed, want_normed, rtol=tol, atol=tol)
                    logits = (normed.float() @ gate.weight.float().T + (gate.bias.float() if bias else 0)).to(dtype)
                    want = make_router(routing, top_k)(logits)
                    if dtype == torch.float32:
                        assert torch.equal(routed.ids, want.ids), (routing, hidden, n_experts, routed.ids, want.ids)
                    else:  # the chosen experts' logits are the k largest (ties within a unit may swap experts)
                        chosen = logits.float().gather(1, routed.ids)
                        torch.testing.assert_close(chosen, logits.float().topk(top_k).values, rtol=tol, atol=tol)
                    torch.testing.assert_close(routed.weights, want.weights, rtol=tol, atol=tol)
                    again = norm_route_topk(*args, renormalize=renormalize, rows=rows)
                    assert torch.equal(again[0], normed) and torch.equal(again[1], total)
                    assert torch.equal(again[2].ids, routed.ids) and torch.equal(again[2].weights, routed.weights)
                    checked += 1
    assert checked == 2 * 7 * 3, checked  # dtypes x (shape, tokens) x routers
    print("ok")
""")


@pytest.mark.slow  # ~40 s under the interpreter; the kernel is opt-in (INFERNEO_CUDA_NORM_ROUTER)
def test_norm_route_kernel_matches_the_norm_linear_and_router():
    _run(_NORM_ROUTE_SCRIPT)


# Decode steps of tiny mixture-of-experts models through the whole CUDA transform with the Triton attention backend
# (under the interpreter), against the plain PyTorch model: at 1 token the input norm + q/k/v GEMV, and Qwen3-MoE's
# q/k norm + rotary kernel (gpt-oss's rotary kernel) writes the cache (no store_kv launch); mode "norm_router": at 1 and 2 tokens the fused
# norm + router + top-k kernel runs (not at the prefill); mode "norm_gemv" (the default switches): at 1 token the
# post-attention norm inside the router GEMV, then the routing kernel.
_DECODE_SCRIPT = textwrap.dedent("""
    import os, sys
    MODE = sys.argv[3]
    if MODE == "norm_router":
        os.environ["INFERNEO_CUDA_NORM_ROUTER"] = "1"  # the fused norm + router is opt-in
        os.environ["INFERNEO_CUDA_NORM_ROUTER_GEMV"] = "0"  # (and the switch of the other path, off)
    import copy, torch
    from inferneo.attention.triton_backend import TritonBackend
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels import triton_attention, triton_gemv, triton_routing
    from inferneo.model_executor.device_kernels import NormFusedMoeLayer, use_device_kernels
    from inferneo.model_executor.layers.gpu_linear import DecodeGemv, DecodeLinear
    from inferneo.testing.tiny_models import make_tiny_checkpoint
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from paged_decode_steps import generate
    from test_tensor_parallel_layers import _build
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()

    calls = {"store_kv": 0, "norm_route": 0, "norm_gemv": 0, "route_topk": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    triton_attention.store_kv = counted("store_kv", triton_attention.store_kv)
    triton_routing.norm_route_topk = counted("norm_route", triton_routing.norm_route_topk)
    triton_gemv.norm_gemv = counted("norm_gemv", triton_gemv.norm_gemv)
    triton_routing.route_topk = counted("route_topk", triton_routing.route_topk)

    class OneRowGemv(DecodeGemv):
        # the GEMV with its input norm for any one-row input (the real one takes CUDA half-precision rows only)

        def norm_applies(self, x, weight):
            return x.shape[0] == 1 and x.is_contiguous()

    for arch in ("qwen3_moe", "gpt_oss"):
        plain, config = _build(make_tiny_checkpoint(sys.argv[1] + "/" + arch, arch, num_heads=4, num_kv_heads=2))
        fused = copy.deepcopy(plain)
        for layer in fused.layers:
            layer.self_attn.backend = TritonBackend(prefill_block_m=16)
        counts = use_device_kernels(fused, torch.device("cuda"), KernelConfig(cuda_pdl=False))
        assert counts["NormFusedMoeLayer"] == config.num_layers, counts
        for layer in fused.layers:  # CPU weights are no DecodeLinear: the q/k/v norm + GEMV is switched on here
            gemv = OneRowGemv(triton_gemv, False, False)
            layer.self_attn.qkv_proj = DecodeLinear(layer.self_attn.qkv_proj, gemv)  # F.linear on CPU
            layer.norm_gemv = gemv
            assert (layer.router_gemv is not None) == (MODE == "norm_gemv")
            if MODE == "norm_gemv":
                layer.router_gemv = gemv
        for prompts in ([[5, 17, 33, 2, 9, 100, 250, 7], [40, 41, 42, 43, 44]], [[3, 1, 4, 1, 5, 9]]):
            want, _ = generate(plain, prompts, 3, None)
            forced = [w.argmax(-1) for w in want]
            calls.update(store_kv=0, norm_route=0, norm_gemv=0, route_topk=0)
            got, _ = generate(fused, prompts, 3, forced)
            one_row = 3 * config.num_layers if len(prompts) == 1 else 0  # the decode steps of one request
            if MODE == "norm_router":
                assert calls["norm_route"] == 3 * config.num_layers, calls  # the decode steps only
                assert calls["norm_gemv"] == one_row, calls
            else:  # q/k/v and router GEMVs with their norms at one row; the routing kernel at every step
                assert calls["norm_route"] == 0 and calls["norm_gemv"] == 2 * one_row, calls
                assert calls["route_topk"] == 4 * config.num_layers, calls
            assert calls["store_kv"] == 0, calls  # the (q/k norm +) rotary kernel writes the cache
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
                assert torch.equal(g.argmax(-1), w.argmax(-1))
        if MODE == "norm_router":
            assert all(not m.norm_router.tickets.any() for m in fused.modules() if isinstance(m, NormFusedMoeLayer))
    print("ok")
""")


@pytest.mark.slow  # ~50 s under the interpreter; the GEMV and q/k-norm kernels keep their own CI tests
@pytest.mark.parametrize("mode", ["norm_router", "norm_gemv"])
def test_decode_steps_of_tiny_moe_models_through_the_fused_kernels(tmp_path, mode):
    _run(_DECODE_SCRIPT, str(tmp_path), os.path.dirname(__file__), mode)
