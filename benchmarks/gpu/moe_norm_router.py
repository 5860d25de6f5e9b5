#!/usr/bin/env python3
"""The batch-1 mixture-of-experts block after the attention output: the post-attention norm inside the router GEMV.

Issue 19's batch-1 Qwen3-30B-A3B step ran five launches after the attention output projection of every layer: the
RMSNorm (with the residual add), the router GEMV, the routing kernel and the two few-token expert kernels. With
``INFERNEO_CUDA_NORM_ROUTER_GEMV`` (default on) it runs four: the residual add and norm inside the router GEMV
(``triton_gemv.norm_gemv(store_normed=True)``, which stores the normed row for the routing and the experts).

1. **check** (bf16, the router shapes of Qwen3-30B-A3B and gpt-oss-20b, four draws each): the fused GEMV against
   the RMSNorm kernel and the GEMV (normed row and residual sum equal, the logits' differences); the whole block
   (output GEMV, then the four or five launches) new against old on the same inputs, and a CUDA graph of the new
   block replayed three times (its output poisoned before each replay) equal to eager.
2. **time** (Qwen3-30B-A3B, one token, programmatic dependent launch): 48 calls in one CUDA graph, each on its own
   input row, residual, output-projection, norm and router weights and one of four layers' expert weights (nothing
   that a real step reads from memory comes from L2): the block old and new, twice each in alternation; the norm
   and router alone (RMSNorm + GEMV against the fused GEMV in three tilings).

Writes ``moe_norm_router.json`` and ``.log`` to ``--out``. ``--smoke`` runs it on CPU under Triton's interpreter
with tiny shapes (the numbers mean nothing; it checks the script). (The call recorded on 2026-12-03 ran this
script at commit 3c07985, which also timed a packed-key top-k in the routing kernel, since dropped.)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402

from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels import triton_gemv, triton_moe, triton_routing  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768, router_bias=False, o_in=4096),
    "gpt-oss-20b": dict(experts=32, top_k=4, hidden=2880, inter=2880, router_bias=True, o_in=4096),
}
LAYERS, WEIGHT_SETS = 48, 4
DEVICE = "cuda"
DTYPE = torch.bfloat16


def time_us(calls) -> float:
    """Mean microseconds of one of ``calls`` (``moe_decode_sweep.time_us``: a CUDA graph, or the wall clock)."""
    import moe_decode_sweep

    moe_decode_sweep.DEVICE = DEVICE
    return moe_decode_sweep.time_us(calls)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_norm_router(name: str, shape: dict, log) -> dict:
    h, e = shape["hidden"], shape["experts"]
    rows = []
    for _ in range(4):
        x, res = torch.randn(1, h, device=DEVICE).to(DTYPE), torch.randn(1, h, device=DEVICE).to(DTYPE)
        norm_w = (torch.rand(h, device=DEVICE) + 0.5).to(DTYPE)
        gate_w = (torch.randn(e, h, device=DEVICE) / h**0.5).to(DTYPE)
        gate_b = (torch.randn(e, device=DEVICE) * 0.1).to(DTYPE) if shape["router_bias"] else None
        logits, total, normed = triton_gemv.norm_gemv(x, res, norm_w, 1e-6, gate_w, gate_b, store_normed=True)
        want_normed, want_total = elementwise.rms_norm(x.clone(), res.clone(), norm_w, 1e-6)
        want_logits = triton_gemv.gemv(want_normed, gate_w, gate_b)
        rows.append({"normed_equal": torch.equal(normed, want_normed), "residual_equal": torch.equal(total, want_total),
                     "logits_max_abs_diff": (logits.float() - want_logits.float()).abs().max().item(),
                     "logits_unequal": int((logits != want_logits).sum().item())})
    out = {"normed_equal": all(r["normed_equal"] for r in rows), "residual_equal": all(r["residual_equal"] for r in rows),
           "logits_max_abs_diff": max(r["logits_max_abs_diff"] for r in rows),
           "logits_unequal": sum(r["logits_unequal"] for r in rows)}
    log(f"{name}: norm + router GEMV storing the normed row vs RMSNorm + GEMV (4 draws): {out}")
    return out


def make_experts(shape: dict, seed: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    return {"w13": (torch.randn(e, 2 * i, h, device=DEVICE, generator=g) * 0.02).to(DTYPE),
            "w2": (torch.randn(e, h, i, device=DEVICE, generator=g) * 0.02).to(DTYPE)}


def make_layers(shape: dict) -> list[dict]:
    h, e, o_in = shape["hidden"], shape["experts"], shape["o_in"]
    sets = [make_experts(shape, seed=10 + i) for i in range(WEIGHT_SETS)]
    return [dict(attn=torch.randn(1, o_in, device=DEVICE).to(DTYPE), res=torch.randn(1, h, device=DEVICE).to(DTYPE),
                 o_w=(torch.randn(h, o_in, device=DEVICE) / o_in**0.5).to(DTYPE),
                 norm_w=(torch.rand(h, device=DEVICE) + 0.5).to(DTYPE),
                 gate_w=(torch.randn(e, h, device=DEVICE) / h**0.5).to(DTYPE), ex=sets[i % WEIGHT_SETS])
            for i in range(LAYERS)]


def block(p, k: int, fused_norm: bool, pdl: bool):
    """The output GEMV, then the MoE block at one token: RMSNorm (residual add in place, as the layer's) + router
    GEMV, or the GEMV with the norm inside; then the routing kernel and the two expert kernels."""
    x = triton_gemv.gemv(p["attn"], p["o_w"], pdl=pdl)
    if fused_norm:
        logits, total, normed = triton_gemv.norm_gemv(x, p["res"], p["norm_w"], 1e-6, p["gate_w"], pdl=pdl,
                                                      store_normed=True)
    else:
        normed, total = elementwise.rms_norm(x, p["res"], p["norm_w"], 1e-6, pdl=pdl)
        logits = triton_gemv.gemv(normed, p["gate_w"], pdl=pdl)
    routed = triton_routing.route_topk(logits, k, renormalize=True, pdl=pdl)
    out = triton_moe.triton_fused_experts(normed, p["ex"]["w13"], p["ex"]["w2"], routed.weights, routed.ids, pdl=pdl)
    return out, total, routed


def check_block(layers: list[dict], k: int, log) -> dict:
    p = layers[0]
    res0 = p["res"].clone()
    new, new_total, new_routed = block(dict(p, res=res0.clone()), k, True, pdl=False)
    old, old_total, old_routed = block(dict(p, res=res0.clone()), k, False, pdl=False)
    out = {"output_equal": torch.equal(new, old), "output_rel_diff": rel(new, old),
           "residual_equal": torch.equal(new_total, old_total), "ids_equal": torch.equal(new_routed.ids, old_routed.ids)}
    if DEVICE == "cuda":
        q = dict(p, res=res0.clone())
        block(q, k, True, pdl=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, _, _ = block(q, k, True, pdl=True)
        equal = True
        for _ in range(3):
            captured.fill_(float("nan"))  # poisoned: every element must be written again
            graph.replay()
            torch.cuda.synchronize()
            equal &= torch.equal(captured, new)
        out["graph_replays_equal"] = equal
    log(f"block (output GEMV + MoE, one token) new vs old on the same inputs: {out}")
    return out


def time_block(layers: list[dict], k: int, log) -> dict:
    pdl = DEVICE == "cuda"
    out = {}
    variants = {"old": False, "new": True}
    for rep in (1, 2):
        for name, fused in variants.items():
            us = time_us([functools.partial(block, dict(p, res=p["res"].clone()), k, fused, pdl) for p in layers])
            out[f"block_{name}_us_{rep}"] = us
        log(f"output GEMV + MoE block, one token, a layer (run {rep}): " + ", ".join(
            f"{name} {out[f'block_{name}_us_{rep}']:.2f} us" for name in variants))
    h = layers[0]["res"].shape[1]
    for p in layers:
        p["x"] = torch.randn(1, h, device=DEVICE).to(DTYPE)

    def norm_router_old(p):
        normed, _ = elementwise.rms_norm(p["x"], p["res"], p["norm_w"], 1e-6, pdl=pdl)
        return triton_gemv.gemv(normed, p["gate_w"], pdl=pdl)

    out["norm_router_old_us"] = time_us([functools.partial(norm_router_old, dict(p, x=p["x"].clone(),
                                                                                 res=p["res"].clone()))
                                         for p in layers])
    for config in ((4, 4), (8, 8), (16, 8)):
        out[f"norm_router_fused_{config[0]}x{config[1]}_us"] = time_us([functools.partial(
            triton_gemv.norm_gemv, p["x"], p["res"], p["norm_w"], 1e-6, p["gate_w"], config=config, pdl=pdl,
            store_normed=True) for p in layers])
    log("norm + router: " + ", ".join(f"{key} {v:.2f}" for key, v in out.items() if key.startswith("norm_router")))
    return out


def _smoke() -> None:
    global DEVICE, LAYERS, WEIGHT_SETS, DTYPE
    DEVICE, LAYERS, WEIGHT_SETS, DTYPE = "cpu", 2, 1, torch.float32
    for shape in SHAPES.values():
        shape.update(experts=16, top_k=4, hidden=64, inter=32, o_in=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_norm_router")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), to check it")
    args = parser.parse_args()
    if args.smoke:
        _smoke()
        sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the interpreter's gaps, patched as the tests patch them
        from triton_interpreter_shims import patch_interpreter

        patch_interpreter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from moe_kernel_sweep import timestamped_log

    log = timestamped_log(out / "moe_norm_router.log")
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "triton": triton_moe.triton.__version__, "shapes": SHAPES}
    for name, shape in SHAPES.items():
        results[f"check_{name}"] = {"norm_router": check_norm_router(name, shape, log)}
    shape = SHAPES["qwen3-30b-a3b"]
    layers = make_layers(shape)
    results["check_block"] = check_block(layers, shape["top_k"], log)
    results["time"] = time_block(layers, shape["top_k"], log)
    (out / "moe_norm_router.json").write_text(json.dumps(results, indent=1) + "\n")
    checks = [results[f"check_{n}"] for n in SHAPES]
    ok = all(c["norm_router"]["normed_equal"] and c["norm_router"]["residual_equal"] for c in checks)
    ok &= results["check_block"]["residual_equal"] and results["check_block"].get("graph_replays_equal", True)
    log(f"checks {'passed' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
