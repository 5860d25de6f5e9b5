#!/usr/bin/env python3
"""Mixture-of-experts models on one GPU: Inferneo beside Hugging Face transformers in one run (issue 19).

Models: the Qwen3-30B-A3B architecture (``preset:qwen3-30b-a3b``: 48 layers, 128 experts, top-8) and, when its
preset exists, gpt-oss-20b (``preset:gpt-oss-20b``), bf16 with dummy (random) weights. Sections, each timed, each in
its own try/except, later ones shrinking or skipping as the deadline nears:

  1. ceilings: device copy bandwidth and bf16 matmul rate;
  2. ``qwen3``: the engine; decode-step latency at batch 1 and 32 (1024 tokens of context; CUDA graphs, with and
     without asynchronous scheduling) against its floor: the bytes of everything a step must read, with only the
     *active* experts counted: at batch 1 the ``top_k`` of every layer, at batch 32 the distinct experts the
     batch's tokens touch (counted on the same run, eager, per layer); plus the KV cache read; then W1
     (256 x 1024 -> 128) and W2 (256 x 128 -> 1024) output tok/s;
  3. ``hf_qwen3``: transformers on the same config with random weights (its default experts implementation):
     static ``generate`` on 64 of W1's prompts at batch 64, and one batch-1 decode step (1024-token prompt);
  4. ``gptoss`` / ``hf_gptoss``: W1 for gpt-oss-20b, Inferneo and transformers (64 prompts, batch 64).

``--ab 'name:VAR=v,...;name2:...'`` (with the decode steps): after them, the batch-1 and batch-32 steps under each
setting of kernel environment variables, the decode graphs captured again for each, ``--ab-rounds`` rounds in
alternation, with graph-mode kernel profiles (``decode_ab``, ``kernel_timeline.py``).

Writes ``moe_suite.json`` and ``moe_suite.log`` to ``--out`` (default ``$OUT``). ``--smoke`` runs everything with
tiny models on CPU (the numbers mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
from floors import Ceilings, sync, timed  # noqa: E402
from h100_suite import Suite, free_memory, generate_ids, greedy, run_workloads, sec_ceilings, step_latency  # noqa: E402
from hf_baselines import build_hf_model, hf_generate  # noqa: E402

from inferneo import LLM  # noqa: E402
from inferneo.model_executor import arch_presets  # noqa: E402
from inferneo.model_executor.arch_presets import preset_config  # noqa: E402
from inferneo.model_executor.layers.moe import FusedMoE  # noqa: E402

FULL = dict(
    qwen3="qwen3-30b-a3b", gptoss="gpt-oss-20b", device="cuda", deadline=540.0,
    w1=(256, 1024, 128), w2=(256, 128, 1024), decode_batches=(1, 32), decode_ctx=1024, decode_steps=32,
    hf_w1_prompts=64, hf_batch=64, hf_w2_prompts=64, hf_w2_tokens=256, hf_decode_ctx=1024, hf_decode_tokens=16,
    engine=dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.92),
)
SMOKE = dict(
    FULL, qwen3="smoke-qwen3-moe", gptoss="smoke-gpt-oss", device="cpu", deadline=600.0,
    w1=(4, 32, 4), w2=(4, 8, 16), decode_batches=(1, 4), decode_ctx=32, decode_steps=3,
    hf_w1_prompts=2, hf_batch=2, hf_w2_prompts=2, hf_w2_tokens=4, hf_decode_ctx=16, hf_decode_tokens=3,
    engine=dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_memory=32 * 2**20),
)


# ---- what a decode step must read --------------------------------------------------------------------------------


def moe_bytes(config: dict, dtype_bytes: int = 2) -> dict:
    """Bytes of a mixture-of-experts model's parts that a decode step reads: per layer the attention, norms and
    router; one expert; the LM head (the embedding is read only for the batch's rows); and KV bytes per token."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_experts") or config["num_local_experts"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + hidden * experts + 2 * hidden  # attention, router, the two norms
    return {"layers": layers, "dense_per_layer": per_layer * dtype_bytes, "expert": 3 * hidden * inter * dtype_bytes,
            "lm_head": config["vocab_size"] * hidden * dtype_bytes, "top_k": config["num_experts_per_tok"],
            "kv_per_token": 2 * layers * kv_heads * head_dim * dtype_bytes}


def decode_floor_s(parts: dict, experts_per_layer: float, batch: int, context: float, ceil: Ceilings) -> float:
    """The least time of one decode step: its weight bytes with ``experts_per_layer`` experts read in every layer,
    plus the batch's KV cache, over the copy bandwidth (read + write counted, as ``floors.py`` does)."""
    weights = parts["layers"] * (parts["dense_per_layer"] + experts_per_layer * parts["expert"]) + parts["lm_head"]
    return (weights + batch * context * parts["kv_per_token"]) / ceil.copy_bytes_per_s


def touched_experts(llm: LLM, s: Suite, batch: int, top_k: int) -> float:
    """Mean over layers and decode steps of the distinct experts a step of ``batch`` tokens routes to, counted on
    eager steps with hooks on the routers (CUDA graphs would skip the hooks)."""
    runner = llm.engine.runner
    counts: list[int] = []

    def hook(_module, _inputs, logits):
        if logits.shape[0] == batch:  # decode steps only (prefill chunks have other row counts)
            counts.append(int(torch.topk(logits.float(), top_k, dim=-1).indices.unique().numel()))

    layers = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
    handles = [layer.gate.register_forward_hook(hook) for layer in layers]
    graphs = runner.use_cuda_graphs
    runner.use_cuda_graphs = False
    try:
        step_latency(llm, s, batch, 64, 2)
    finally:
        runner.use_cuda_graphs = graphs
        for handle in handles:
            handle.remove()
    if not counts and batch == 1:  # no gate module ran (the router GEMV fused with the norm): one token, k experts
        return float(top_k)
    return sum(counts) / max(1, len(counts))


def decode_kernel_profile(llm: LLM, s: Suite, steps: int = 5, top: int = 15) -> dict:
    """The kernels of ``steps`` eager batch-1 decode steps (CUDA graphs off, so that the profiler sees each launch;
    64-token prompt, its prefill outside the profile), by total device time (self CPU time on CPU): the ``top``
    ones with their calls and microseconds per step, and the sum over all kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    eng, runner = llm.engine, llm.engine.runner
    cuda = torch.cuda.is_available() and s.cfg["device"] == "cuda"
    request = eng.add_request(f"profile-{time.monotonic_ns()}", s.prompts(1, 63, eng.vocab_size)[0],
                              greedy(steps + 8))
    sched, graphs = eng.scheduler, runner.use_cuda_graphs
    runner.use_cuda_graphs = False
    try:
        while len(sched.waiting) or any(r.num_output_tokens == 0 for r in sched.running):
            eng.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                eng.step()
            sync()
    finally:
        runner.use_cuda_graphs = graphs
        eng.abort_request(request)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not cuda or str(e.device_type).endswith("CUDA")]
    rows = sorted(({"name": e.key[:100], "calls_per_step": e.count / steps,
                    "us_per_step": (getattr(e, key, 0) or 0) / steps} for e in events), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    s.log(f"batch-1 eager decode step, {'kernels by device' if cuda else 'ops by self CPU'} time: {total:.0f} us/step "
          f"over {len(rows)} {'kernels' if cuda else 'ops'} ({steps} steps)")
    for r in rows[:top]:
        s.log(f"  {r['us_per_step']:8.1f} us  {r['calls_per_step']:6.1f} calls  {r['name']}")
    return {"steps": steps, "total_us_per_step": total, "top": rows[:top]}


AB_SETTINGS: list[tuple[str, dict[str, str]]] = []
"""``--ab``: kernel settings (environment variables the launchers read when a graph is captured) timed against
each other in this process, each round re-capturing the decode graphs under every setting in turn."""
AB_ROUNDS = 2


def parse_ab(text: str) -> list[tuple[str, dict[str, str]]]:
    """``name:VAR=value,VAR=value;name2:...`` (an empty name list after the colon: the environment as it is)."""
    settings = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        name, _, assigns = item.partition(":")
        env = dict(a.split("=", 1) for a in filter(None, (x.strip() for x in assigns.split(","))))
        settings.append((name.strip(), env))
    return settings


def decode_ab(s: Suite, llm: LLM, parts: dict) -> dict:
    """Batch-1 and batch-32 steps (graphs + async) under every ``AB_SETTINGS`` entry, ``AB_ROUNDS`` rounds in
    alternation; before each, the decode graphs are captured again with that setting's environment. The graph-mode
    kernel profile of the batch-1 step is taken under the first and the last setting of the last round. The
    environment and graphs are restored at the end."""
    runner = llm.engine.runner
    ctx, steps = s.cfg["decode_ctx"], s.cfg["decode_steps"]
    keys = {k for _, env in AB_SETTINGS for k in env}
    saved = {k: os.environ.get(k) for k in keys}
    rows: list[dict] = []
    profiles: dict = {}
    graphs_on = runner.graphs is not None  # CPU (the smoke run): eager steps, nothing to capture
    try:
        for rnd in range(AB_ROUNDS):
            for i, (name, env) in enumerate(AB_SETTINGS):
                for k in keys:
                    os.environ.pop(k, None)
                    if saved[k] is not None:
                        os.environ[k] = saved[k]
                os.environ.update(env)
                if graphs_on:
                    runner.release_cuda_graphs()
                    runner.capture_cuda_graphs()
                llm.engine.core.async_scheduling = True
                for batch in s.cfg["decode_batches"]:
                    row = step_latency(llm, s, batch, ctx, steps)
                    touched = parts["top_k"] if batch == 1 else None
                    if touched is not None:
                        floor = decode_floor_s(parts, touched, row["running"], row["context"], s.ceilings) * 1e3
                        row.update(floor_ms=floor, ratio=row["step_ms"] / floor)
                    row.update(setting=name, env=env, round=rnd)
                    rows.append(row)
                    s.log(f"A/B round {rnd} {name:34s} batch {batch:3d}: {row['step_ms']:.3f} ms/step"
                          + (f", x{row['ratio']:.3f} of its floor" if "ratio" in row else ""))
                llm.engine.core.async_scheduling = False
                if graphs_on and rnd == AB_ROUNDS - 1 and i in (0, len(AB_SETTINGS) - 1) and s.left() > 30:
                    try:
                        profiles[name] = decode_graph_profile(llm, s)
                    except Exception as exc:  # noqa: BLE001
                        s.log(f"graph profile failed: {type(exc).__name__}: {exc}")
    finally:
        for k in keys:
            os.environ.pop(k, None)
            if saved[k] is not None:
                os.environ[k] = saved[k]
        if graphs_on:
            runner.release_cuda_graphs()
            runner.capture_cuda_graphs()
    summary = {}
    for name, _ in AB_SETTINGS:
        for batch in s.cfg["decode_batches"]:
            times = [r["step_ms"] for r in rows if r["setting"] == name and r["batch"] == batch]
            summary[f"{name} b{batch}"] = {"step_ms": times, "best_ms": min(times)}
            s.log(f"A/B {name:34s} batch {batch:3d}: {', '.join(f'{t:.3f}' for t in times)} ms")
    return {"rows": rows, "summary": summary, "graph_profiles": profiles}


def decode_graph_profile(llm: LLM, s: Suite, steps: int = 8, top: int = 14) -> dict:
    """The kernels of ``steps`` batch-1 decode steps replayed from the CUDA graphs (synchronous scheduling), from
    the profiler's trace: per kernel name its calls, duration and the time it adds to the stream's end (under PDL a
    kernel's duration includes its wait for the one before; ``kernel_timeline``), per step."""
    from kernel_timeline import by_name, critical_path, kernel_events
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    request = eng.add_request(f"gprofile-{time.monotonic_ns()}", s.prompts(1, s.cfg["decode_ctx"] - 1,
                                                                          eng.vocab_size)[0], greedy(steps + 8))
    sched = eng.scheduler
    try:
        while len(sched.waiting) or any(r.num_output_tokens == 0 for r in sched.running):
            eng.step()
        eng.step()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            sync()
    finally:
        eng.abort_request(request)
    rows = by_name(critical_path(kernel_events(prof)), steps)
    total = sum(r["added_us"] for r in rows)
    s.log(f"batch-1 graph decode step, kernels by added time: {total:.0f} us/step added, "
          f"{sum(r['gap_us'] for r in rows):.0f} us/step idle ({steps} steps)")
    for r in rows[:top]:
        s.log(f"  {r['added_us']:8.1f} us added {r['dur_us']:8.1f} us dur {r['calls']:6.1f} calls  {r['kernel']}")
    return {"steps": steps, "added_us_per_step": total, "rows": rows}


# ---- sections ----------------------------------------------------------------------------------------------------


def build_engine(s: Suite, preset: str) -> LLM:
    engine_kw = dict(s.cfg["engine"])
    llm, seconds = timed(lambda: LLM(f"preset:{preset}", load_format="dummy", dtype="bfloat16",
                                     device=s.cfg["device"], **engine_kw))
    eng = llm.engine
    moe_layers = sum(isinstance(m, FusedMoE) for m in eng.runner.model.modules())
    kernels = {type(m).__name__ for m in eng.runner.model.modules()}
    expert_kernel = next((m.expert_kernel.__name__ for m in eng.runner.model.modules() if isinstance(m, FusedMoE)),
                         None)
    router = next((type(m.router).__name__ for m in eng.runner.model.modules() if isinstance(m, FusedMoE)), None)
    s.log(f"{preset}: engine ready in {seconds:.1f} s, KV {eng.kv_capacity_tokens} tokens, {moe_layers} MoE layers "
          f"through {expert_kernel} (router {router}), backend {eng.runner.backend.name}; modules: "
          f"{', '.join(sorted(kernels))}")
    return llm, {"build_s": seconds, "kv_tokens": eng.kv_capacity_tokens, "moe_layers": moe_layers,
                 "expert_kernel": expert_kernel, "router": router, "modules": sorted(kernels), **engine_kw}


def sec_decode(s: Suite, llm: LLM, preset: str) -> dict:
    config = preset_config(preset)
    parts = moe_bytes(config)
    runner = llm.engine.runner
    ctx, steps = s.cfg["decode_ctx"], s.cfg["decode_steps"]
    step_latency(llm, s, 2, 32, 2)  # warm-up
    rows = []
    for batch in s.cfg["decode_batches"]:
        touched = touched_experts(llm, s, batch, parts["top_k"])
        for mode, async_on in (("graph", False), ("graph+async", True)):
            llm.engine.core.async_scheduling = async_on
            row = step_latency(llm, s, batch, ctx, steps)
            floor = decode_floor_s(parts, touched, row["running"], row["context"], s.ceilings)
            row.update(mode=mode if runner.graphs is not None else mode.replace("graph", "eager"),
                       experts_per_layer=touched, floor_ms=floor * 1e3, ratio=row["step_ms"] / (floor * 1e3))
            rows.append(row)
            s.log(f"decode batch {batch:3d} ({row['running']} running) ctx {row['context']:.0f} {row['mode']:11s}: "
                  f"{row['step_ms']:.2f} ms/step, floor {row['floor_ms']:.2f} ms ({touched:.1f} experts/layer), "
                  f"ratio {row['ratio']:.2f}")
        llm.engine.core.async_scheduling = False
    out = {"rows": rows, "bytes": parts}
    if AB_SETTINGS:
        try:
            out["ab"] = decode_ab(s, llm, parts)
        except Exception as exc:  # noqa: BLE001
            s.log(f"decode A/B failed: {type(exc).__name__}: {exc}")
    if s.left() > 90:  # a breakdown of the batch-1 step; never worth losing the rest of the run for
        try:
            out["profile_b1"] = decode_kernel_profile(llm, s)
        except Exception as exc:  # noqa: BLE001
            s.log(f"decode kernel profile failed: {type(exc).__name__}: {exc}")
    return out


def sec_workload(s: Suite, llm: LLM, name: str) -> dict:
    n, plen, olen = s.cfg[name]
    llm.engine.core.async_scheduling = True  # the engine's default on CUDA
    vocab = llm.engine.vocab_size
    prompts = s.prompts(n, plen, vocab)
    generate_ids(llm, s.prompts(2, plen, vocab), 4)  # warm-up at this prompt length
    outputs, seconds = timed(lambda: generate_ids(llm, prompts, olen))
    produced = sum(len(o) for o in outputs)
    llm.engine.core.async_scheduling = False
    s.log(f"{name.upper()} Inferneo: {n} prompts x {plen} -> {olen}: {seconds:.1f} s, {produced / seconds:.0f} "
          f"output tok/s")
    return {"prompts": n, "prompt_len": plen, "output_len": olen, "seconds": seconds, "output_tokens": produced,
            "output_tok_per_s": produced / seconds}


def sec_inferneo(s: Suite, preset: str, workloads: tuple[str, ...], decode: bool) -> dict:
    llm, info = build_engine(s, preset)
    out: dict = {"engine": info}
    try:
        if decode:
            out["decode"] = sec_decode(s, llm, preset)
            s.write()
        run_workloads(s, llm, out, workloads, sec_workload, min_left=40)
    finally:
        llm.shutdown()
        del llm
        free_memory()
    return out


def hf_decode_step(model, s: Suite, vocab: int) -> dict:
    """One batch-1 decode step of ``generate``: (time for 1 + n new tokens - time for 1) / n."""
    prompt = s.prompts(1, s.cfg["hf_decode_ctx"], vocab)
    n = s.cfg["hf_decode_tokens"]
    hf_generate(model, prompt, 2, batch_size=1)  # warm-up
    _, first = timed(lambda: hf_generate(model, prompt, 1, batch_size=1))
    _, more = timed(lambda: hf_generate(model, prompt, 1 + n, batch_size=1))
    return {"context": s.cfg["hf_decode_ctx"], "step_ms": (more - first) / n * 1e3}


def hf_workload(model, s: Suite, vocab: int, name: str) -> dict:
    """HF static ``generate`` on a subset of workload ``name`` (W1: ``hf_w1_prompts`` prompts; W2: ``hf_w2_prompts``
    prompts and only ``hf_w2_tokens`` of the 1,024 output tokens, the decode rate being what the figure measures),
    ``hf_batch`` prompts at a time."""
    n_all, plen, olen = s.cfg[name]
    n = s.cfg[f"hf_{name}_prompts"]
    olen = s.cfg.get(f"hf_{name}_tokens", olen)
    prompts = s.prompts(n, plen, vocab)
    outputs, seconds = timed(functools.partial(hf_generate, model, prompts, olen, s.cfg["hf_batch"]))
    tps = sum(len(o) for o in outputs) / seconds
    s.log(f"{name.upper()} HF generate (batch {s.cfg['hf_batch']}, {n} of {n_all} prompts, {olen} tokens each): "
          f"{seconds:.1f} s, {tps:.0f} output tok/s")
    return {"prompts": n, "of": n_all, "output_len": olen, "batch_size": s.cfg["hf_batch"], "seconds": seconds,
            "output_tok_per_s": tps}


def sec_hf(s: Suite, preset: str, decode: bool, workloads: tuple[str, ...] = ("w1",)) -> dict:
    dev = s.cfg["device"]
    model, build_s = timed(lambda: build_hf_model(preset_config(preset), dev, torch.bfloat16))
    vocab = model.config.vocab_size
    impl = getattr(model.config, "_experts_implementation", None)
    s.log(f"HF {preset} built in {build_s:.1f} s (experts implementation {impl})")
    out: dict = {"build_s": build_s, "experts_implementation": impl}
    try:
        hf_generate(model, s.prompts(2, 32, vocab), 4, batch_size=2)  # warm-up
        if decode:
            out["decode_b1"] = hf_decode_step(model, s, vocab)
            s.log(f"HF batch-1 decode step at context {out['decode_b1']['context']}: "
                  f"{out['decode_b1']['step_ms']:.1f} ms")
        for name in workloads:
            if s.left() > 30:
                out[f"{name}_static"] = hf_workload(model, s, vocab, name)
    finally:
        del model
        free_memory()
    return out


def summarize(s: Suite) -> None:
    sec = s.results["sections"]
    lines, checks = [], {}
    for key, hf_key in (("qwen3", "hf_qwen3"), ("gptoss", "hf_gptoss")):
        ours = (sec.get(key) or {}).get("w1", {}).get("output_tok_per_s")
        hf = (sec.get(hf_key) or {}).get("w1_static", {}).get("output_tok_per_s")
        if ours:
            ratio = ours / hf if hf else None
            ok = ratio is not None and ratio >= 10
            checks[f"{key}_w1"] = {"inferneo_tok_per_s": ours, "hf_tok_per_s": hf, "x_hf": ratio, "target_met": ok}
            lines.append(f"{key} W1: {ours:.0f} tok/s, HF {hf or 0:.0f}, x{ratio or 0:.1f} (need >= x10): "
                         f"{'PASS' if ok else 'FAIL'}")
    w2 = (sec.get("qwen3") or {}).get("w2", {}).get("output_tok_per_s")
    hf_w2 = (sec.get("hf_qwen3") or {}).get("w2_static", {}).get("output_tok_per_s")
    if w2:
        checks["qwen3_w2"] = {"inferneo_tok_per_s": w2, "hf_tok_per_s": hf_w2, "x_hf": w2 / hf_w2 if hf_w2 else None}
        lines.append(f"qwen3 W2: {w2:.0f} tok/s" + (f", HF {hf_w2:.0f}, x{w2 / hf_w2:.1f}" if hf_w2 else ""))
    best: dict[int, dict] = {}
    for row in ((sec.get("qwen3") or {}).get("decode") or {}).get("rows", []):
        if row["batch"] not in best or row["step_ms"] < best[row["batch"]]["step_ms"]:
            best[row["batch"]] = row
    hf_step = (sec.get("hf_qwen3") or {}).get("decode_b1", {}).get("step_ms")
    for batch, row in sorted(best.items()):
        ok = row["ratio"] <= 1.5
        checks[f"qwen3_decode_b{batch}"] = {"step_ms": row["step_ms"], "floor_ms": row["floor_ms"],
                                            "ratio": row["ratio"], "target_met": ok}
        extra = f", HF {hf_step:.1f} ms" if batch == 1 and hf_step else ""
        lines.append(f"qwen3 decode b={batch} {row['mode']}: {row['step_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms "
                     f"({row['experts_per_layer']:.1f} experts/layer), x{row['ratio']:.2f} (need <= 1.5){extra}: "
                     f"{'PASS' if ok else 'FAIL'}")
    s.results["checks"] = checks
    s.log("\n" + "=" * 100)
    for line in lines:
        s.log("  " + line)
    for name, entry in sec.items():
        s.log(f"  {name:<12} {entry.get('status', '?')[:70]:<72} {entry.get('elapsed_s', '-')} s")


def _smoke_presets() -> None:
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    arch_presets.PRESETS["smoke-qwen3-moe"] = preset_config(
        "qwen3-30b-a3b", intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, **tiny)
    if "gpt-oss-20b" in arch_presets.PRESETS:
        arch_presets.PRESETS["smoke-gpt-oss"] = preset_config(
            "gpt-oss-20b", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, experts_per_token=2,
            sliding_window=16, rope_scaling=None, **tiny)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check the script")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default: 540)")
    parser.add_argument("--w2-only", action="store_true",
                        help="Qwen3-30B-A3B's W2 alone, Inferneo and HF (no decode steps, no W1, no gpt-oss)")
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated (e.g. gptoss,hf_gptoss)")
    parser.add_argument("--decode-only", action="store_true",
                        help="Qwen3-30B-A3B's decode steps (and their kernel profile) alone: no W1/W2, no HF, no gpt-oss")
    parser.add_argument("--ab", default="", help="decode A/B settings, 'name:VAR=v,VAR=v;name2:...' (decode_ab)")
    parser.add_argument("--ab-rounds", type=int, default=2)
    args = parser.parse_args()
    global AB_ROUNDS
    AB_SETTINGS[:] = parse_ab(args.ab)
    AB_ROUNDS = args.ab_rounds
    skip = set(filter(None, args.skip.split(",")))
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.deadline is not None:
        cfg["deadline"] = args.deadline
    if args.smoke:
        _smoke_presets()
    s = Suite(Path(args.out), cfg, name="moe_suite")
    s.log(f"inferneo MoE suite ({'smoke' if args.smoke else 'full'}), torch {torch.__version__}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    s.section("ceilings", lambda: sec_ceilings(s))
    if s.ceilings is None:
        s.ceilings = Ceilings(4.0e12, 7.0e14)
        s.log("ceilings unavailable: using nominal 4.0 TB/s, 700 TFLOP/s")
    qwen3, gptoss = cfg["qwen3"], cfg["gptoss"]
    has_gptoss = gptoss in arch_presets.PRESETS
    if args.w2_only:
        skip |= {"gptoss", "hf_gptoss"}
    if args.decode_only:
        skip |= {"hf_qwen3", "gptoss", "hf_gptoss"}
    ours, theirs = (("w2",), ("w2",)) if args.w2_only else (("w1", "w2"), ("w1",))
    if args.decode_only:
        ours = ()
    plan = [("qwen3", lambda: sec_inferneo(s, qwen3, ours, decode=not args.w2_only), 150),
            ("hf_qwen3", lambda: sec_hf(s, qwen3, decode=not args.w2_only, workloads=theirs), 60),
            ("gptoss", lambda: sec_inferneo(s, gptoss, ("w1",), decode=False), 80),
            ("hf_gptoss", lambda: sec_hf(s, gptoss, decode=False), 40)]
    for name, run, min_left in plan:
        if name in skip:
            continue
        if name.endswith("gptoss") and not has_gptoss:
            s.results["sections"][name] = {"status": f"skipped: no preset {gptoss!r} in this build"}
            s.log(f"== {name}: skipped (no preset {gptoss!r})")
            continue
        s.section(name, run, min_left=min_left)
    sync()
    summarize(s)
    path = s.write()
    s.log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
