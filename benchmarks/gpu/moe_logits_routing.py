#!/usr/bin/env python3
"""The batch-1 mixture-of-experts block with the routing inside the expert kernels, checked and timed on one GPU.

Issue 19's batch-1 Qwen3-30B-A3B step ran five launches after the attention output projection of every layer: the
RMSNorm (with the residual add), the router GEMV, the routing kernel and the two few-token expert kernels. With
``INFERNEO_CUDA_MOE_LOGITS_ROUTING`` (default on) it runs three: ``triton_gemv.norm_gemv(store_normed=True)`` (the
residual add and norm inside the router GEMV, the normed row stored for the experts) and
``triton_moe.pair_experts_from_logits`` (each expert kernel computes the token's softmax top-k from the logits).

1. **check** (bf16, the layer shapes of Qwen3-30B-A3B and gpt-oss-20b): the experts routed from the logits against
   ``route_topk`` + ``triton_fused_experts`` on the same logits (1, 2 and 4 tokens, random logits and logits with
   ties at the top; the outputs equal or their largest difference), against a float32 reference; a CUDA graph of
   the new call replayed three times equal to eager; ``norm_gemv(store_normed=True)`` on the router shape against
   the RMSNorm kernel and the GEMV (normed row and residual sum equal, the logits' largest difference).
2. **time** (Qwen3-30B-A3B, one token, programmatic dependent launch): 48 calls in one CUDA graph, each on its own
   input row, residual, norm and router weights and one of four layers' expert weights (so nothing is read from
   L2 that a real step would read from memory), of: the whole block after the output projection (the output
   GEMV first, then the five launches or the three), twice each in alternation; the experts alone (from ids vs
   from logits); the norm and router (RMSNorm + GEMV vs the fused GEMV).

Writes ``moe_logits_routing.json`` and ``.log`` to ``--out``. ``--smoke`` runs it on CPU under Triton's interpreter
with tiny shapes (the numbers mean nothing; it checks the script).
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
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768, activation="silu", bias=False,
                          renormalize=True, router_bias=False, o_in=4096),
    "gpt-oss-20b": dict(experts=32, top_k=4, hidden=2880, inter=2880, activation="swigluoai", bias=True,
                        renormalize=True, router_bias=True, o_in=4096),
}
LAYERS, WEIGHT_SETS = 48, 4
DEVICE = "cuda"
DTYPE = torch.bfloat16


def time_us(calls) -> float:
    """Mean microseconds of one of ``calls`` (``moe_decode_sweep.time_us``: a CUDA graph, or the wall clock)."""
    import moe_decode_sweep

    moe_decode_sweep.DEVICE = DEVICE
    return moe_decode_sweep.time_us(calls)


def make_experts(shape: dict, seed: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    out = {"w13": (torch.randn(e, 2 * i, h, device=DEVICE, generator=g) * 0.02).to(DTYPE),
           "w2": (torch.randn(e, h, i, device=DEVICE, generator=g) * 0.02).to(DTYPE)}
    if shape["bias"]:
        out["b13"] = (torch.randn(e, 2 * i, device=DEVICE, generator=g) * 0.1).to(DTYPE)
        out["b2"] = (torch.randn(e, h, device=DEVICE, generator=g) * 0.1).to(DTYPE)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def reference(x, ex, routed, shape) -> torch.Tensor:
    """The float32 per-pair reference of the routed experts."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = shape["inter"]
    for t in range(x.shape[0]):
        for s in range(routed.ids.shape[1]):
            e = int(routed.ids[t, s])
            gu = ex["w13"][e].float() @ x[t].float()
            if "b13" in ex:
                gu = gu + ex["b13"][e].float()
            gate, up = gu[:inter], gu[inter:]
            if shape["activation"] == "silu":
                h = torch.nn.functional.silu(gate) * up
            else:
                gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
                h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            y = ex["w2"][e].float() @ h.to(x.dtype).float()
            if "b2" in ex:
                y = y + ex["b2"][e].float()
            out[t] += routed.weights[t, s].float() * y
    return out


def check_experts(name: str, shape: dict, log) -> dict:
    ex = make_experts(shape, seed=1)
    k, e, renorm = shape["top_k"], shape["experts"], shape["renormalize"]
    kw = dict(activation=shape["activation"], w13_bias=ex.get("b13"), w2_bias=ex.get("b2"))
    rows, worst_rel, all_equal, max_diff = [], 0.0, True, 0.0
    for tokens in (1, 2, 4):
        for draw in range(6):
            x = torch.randn(tokens, shape["hidden"], device=DEVICE).to(DTYPE)
            logits = (torch.randn(tokens, e, device=DEVICE) * 2).to(DTYPE)
            if draw % 2:  # ties at the top (equal bf16 logits): the lower id first, as route_topk and torch.topk
                logits[:, 3] = logits[:, e - 1] = logits[:, e // 2] = logits.max() + 0.5
            routed = triton_routing.route_topk(logits, k, renormalize=renorm)
            want = triton_moe.triton_fused_experts(x, ex["w13"], ex["w2"], routed.weights, routed.ids, **kw)
            got = triton_moe.pair_experts_from_logits(x, logits, ex["w13"], ex["w2"], k, renormalize=renorm, **kw)
            ref = reference(x, ex, routed, shape)
            diff = (got.float() - want.float()).abs().max().item()
            all_equal &= torch.equal(got, want)
            max_diff = max(max_diff, diff)
            worst_rel = max(worst_rel, rel(got, ref))
            rows.append({"tokens": tokens, "ties": bool(draw % 2), "equal": torch.equal(got, want),
                         "max_abs_diff": diff, "rel_err_vs_f32": rel(got, ref),
                         "route_topk_rel_err_vs_f32": rel(want, ref)})
    # A CUDA graph of the new call (with PDL) replayed three times gives the eager result.
    x = torch.randn(1, shape["hidden"], device=DEVICE).to(DTYPE)
    logits = (torch.randn(1, e, device=DEVICE) * 2).to(DTYPE)
    eager = triton_moe.pair_experts_from_logits(x, logits, ex["w13"], ex["w2"], k, renormalize=renorm, **kw)
    replays_equal = None
    if DEVICE == "cuda":
        triton_moe.pair_experts_from_logits(x, logits, ex["w13"], ex["w2"], k, renormalize=renorm, pdl=True, **kw)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = triton_moe.pair_experts_from_logits(x, logits, ex["w13"], ex["w2"], k, renormalize=renorm,
                                                           pdl=True, **kw)
        replays_equal = True
        for _ in range(3):
            captured.fill_(float("nan"))  # poisoned: every element must be written again
            graph.replay()
            torch.cuda.synchronize()
            replays_equal &= torch.equal(captured, eager)
    out = {"all_equal": all_equal, "max_abs_diff": max_diff, "worst_rel_err_vs_f32": worst_rel,
           "graph_replays_equal": replays_equal, "rows": rows}
    log(f"{name}: experts from logits vs route_topk + experts: all equal {all_equal}, max |diff| {max_diff:.3g}, "
        f"worst rel err vs f32 {worst_rel:.4f} (route_topk path: "
        f"{max(r['route_topk_rel_err_vs_f32'] for r in rows):.4f}), graph replays equal {replays_equal}")
    del ex
    return out


def check_norm_router(name: str, shape: dict, log) -> dict:
    h, e = shape["hidden"], shape["experts"]
    x, res = torch.randn(1, h, device=DEVICE).to(DTYPE), torch.randn(1, h, device=DEVICE).to(DTYPE)
    norm_w = (torch.rand(h, device=DEVICE) + 0.5).to(DTYPE)
    gate_w = (torch.randn(e, h, device=DEVICE) / h**0.5).to(DTYPE)
    gate_b = (torch.randn(e, device=DEVICE) * 0.1).to(DTYPE) if shape["router_bias"] else None
    logits, total, normed = triton_gemv.norm_gemv(x, res, norm_w, 1e-6, gate_w, gate_b, store_normed=True)
    want_normed, want_total = elementwise.rms_norm(x.clone(), res.clone(), norm_w, 1e-6)
    want_logits = triton_gemv.gemv(want_normed, gate_w, gate_b)
    out = {"normed_equal": torch.equal(normed, want_normed), "residual_equal": torch.equal(total, want_total),
           "logits_max_abs_diff": (logits.float() - want_logits.float()).abs().max().item(),
           "logits_unequal": int((logits != want_logits).sum().item())}
    log(f"{name}: norm + router GEMV storing the normed row vs RMSNorm + GEMV: {out}")
    return out


def time_block(log) -> dict:
    shape = SHAPES["qwen3-30b-a3b"]
    h, e, k, o_in = shape["hidden"], shape["experts"], shape["top_k"], shape["o_in"]
    sets = [make_experts(shape, seed=10 + i) for i in range(WEIGHT_SETS)]
    layers = []
    for i in range(LAYERS):
        layers.append(dict(
            attn=torch.randn(1, o_in, device=DEVICE).to(DTYPE), res=torch.randn(1, h, device=DEVICE).to(DTYPE),
            o_w=(torch.randn(h, o_in, device=DEVICE) / o_in**0.5).to(DTYPE),
            norm_w=(torch.rand(h, device=DEVICE) + 0.5).to(DTYPE),
            gate_w=(torch.randn(e, h, device=DEVICE) / h**0.5).to(DTYPE), ex=sets[i % WEIGHT_SETS]))
    pdl = DEVICE == "cuda"

    def old_block(p):
        x = triton_gemv.gemv(p["attn"], p["o_w"], pdl=pdl)
        normed, _ = elementwise.rms_norm(x, p["res"], p["norm_w"], 1e-6, pdl=pdl)  # (in place, as the layer's)
        logits = triton_gemv.gemv(normed, p["gate_w"], pdl=pdl)
        routed = triton_routing.route_topk(logits, k, renormalize=True, pdl=pdl)
        return triton_moe.triton_fused_experts(normed, p["ex"]["w13"], p["ex"]["w2"], routed.weights, routed.ids,
                                               pdl=pdl)

    def new_block(p):
        x = triton_gemv.gemv(p["attn"], p["o_w"], pdl=pdl)
        logits, _, normed = triton_gemv.norm_gemv(x, p["res"], p["norm_w"], 1e-6, p["gate_w"], pdl=pdl,
                                                  store_normed=True)
        return triton_moe.pair_experts_from_logits(normed, logits, p["ex"]["w13"], p["ex"]["w2"], k,
                                                   renormalize=True, pdl=pdl)

    # the same inputs through both blocks: the outputs agree (the logits may differ in a last place, which can
    # swap an expert of nearly equal probability: reported, not asserted)
    p0 = dict(layers[0], res=layers[0]["res"].clone())
    a, b = new_block(p0), old_block(dict(p0, res=p0["res"].clone()))
    out = {"block_rel_diff": rel(a, b)}
    for rep in (1, 2):
        out[f"old_us_{rep}"] = time_us([functools.partial(old_block, dict(p, res=p["res"].clone())) for p in layers])
        out[f"new_us_{rep}"] = time_us([functools.partial(new_block, p) for p in layers])
        log(f"output GEMV + MoE block, one token, a layer: 5 launches {out[f'old_us_{rep}']:.2f} us, "
            f"3 launches {out[f'new_us_{rep}']:.2f} us")
    # the pieces
    for p in layers:
        p["x"] = torch.randn(1, h, device=DEVICE).to(DTYPE)
        p["logits"] = (torch.randn(1, e, device=DEVICE) * 2).to(DTYPE)
        p["routed"] = triton_routing.route_topk(p["logits"], k, renormalize=True)
    out["experts_from_ids_us"] = time_us([functools.partial(
        triton_moe.triton_fused_experts, p["x"], p["ex"]["w13"], p["ex"]["w2"], p["routed"].weights,
        p["routed"].ids, pdl=pdl) for p in layers])

    def route_and_experts(q):
        routed = triton_routing.route_topk(q["logits"], k, renormalize=True, pdl=pdl)
        return triton_moe.triton_fused_experts(q["x"], q["ex"]["w13"], q["ex"]["w2"], routed.weights, routed.ids,
                                               pdl=pdl)

    out["route_and_experts_us"] = time_us([functools.partial(route_and_experts, p) for p in layers])
    out["experts_from_logits_us"] = time_us([functools.partial(
        triton_moe.pair_experts_from_logits, p["x"], p["logits"], p["ex"]["w13"], p["ex"]["w2"], k,
        renormalize=True, pdl=pdl) for p in layers])
    log(f"experts alone: from ids {out['experts_from_ids_us']:.2f} us, routing kernel + experts "
        f"{out['route_and_experts_us']:.2f} us, from logits {out['experts_from_logits_us']:.2f} us")

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
    parser.add_argument("--out", default="/tmp/moe_logits_routing")
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

    log = timestamped_log(out / "moe_logits_routing.log")
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "triton": triton_moe.triton.__version__, "shapes": SHAPES}
    for name, shape in SHAPES.items():
        results[f"check_{name}"] = {"experts": check_experts(name, shape, log),
                                    "norm_router": check_norm_router(name, shape, log)}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["time"] = time_block(log)
    (out / "moe_logits_routing.json").write_text(json.dumps(results, indent=1) + "\n")
    ok = all(results[f"check_{n}"]["experts"]["worst_rel_err_vs_f32"] < 1e-2 for n in SHAPES)
    ok &= all(results[f"check_{n}"]["norm_router"]["normed_equal"] for n in SHAPES) or DEVICE != "cuda"
    ok &= all(results[f"check_{n}"]["experts"]["graph_replays_equal"] is not False for n in SHAPES)
    log(f"checks {'passed' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
