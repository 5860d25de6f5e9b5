#!/usr/bin/env python3
"""Quantized weights on one GPU: FP8 W8A8 and W4A16 beside bf16, and gpt-fast beside them, in one run (issue 20).

The Llama-2-7B architecture (``preset:llama-2-7b``) with dummy weights, drawn directly in each format:

  1. ceilings: device copy bandwidth and bf16 matmul rate;
  2. ``bf16``, ``fp8`` (``quantization="fp8"``: per-channel FP8 weights, per-token dynamic FP8 activations) and
     ``w4a16`` (a copy of the preset whose ``config.json`` says AWQ, 4-bit, group 128): for each, the decode step
     at batch 1 and 32 (1024 tokens of context, CUDA graphs), then W1 (256 x 1024 -> 128) and W2
     (256 x 128 -> 1024) output tok/s; ``fp8-w8a8``: the FP8 decode steps again with the weight-only GEMV off
     (``INFERNEO_FP8_GEMV=0``); ``fp8-nonorm`` / ``fp8-tiles``: the FP8 batch-1 step with the norm-fused GEMV
     switched off (``INFERNEO_FP8_NORM_GEMV=0``) / with the tiling entries of ``--fp8-tiles`` (a tiling file passed
     as ``INFERNEO_FP8_GEMV_CONFIGS``); ``bf16-reduceV`` / ``fp8-reduceV`` (``--fused-reduce V``): the decode
     steps at batch 1 and 4 with ``INFERNEO_DECODE_FUSED_REDUCE=V`` (1: split attention merged in the attention
     kernel at every batch, 0: never; unset, the default: at batch 1); and the same with an FP8 KV cache on bf16 weights (``fp8-kv``: the KV
     capacity and the batch-32 step); ``fp8+fp8kv``: FP8 weights with the FP8 KV cache (decode steps, W1, W2), and
     ``w4a16+fp8kv``: W4A16 weights with the FP8 KV cache (decode steps); ``fp8+fp8kv-wV`` (``--fp8kv-widen V``):
     ``fp8+fp8kv`` with ``INFERNEO_FP8_KV_WIDEN=V`` (how the attention kernels widen the e4m3 cache);
     ``fp8+fp8kv-preV`` (``--fp8kv-prewait V``): ``fp8+fp8kv`` with ``INFERNEO_PREWAIT_LOADS=V``; ``w4a16-rows``: the W4A16 decode steps
     with every layer in the Triton row layout (``INFERNEO_INT4_LAYOUT=rows``: PyTorch's int4 kernel, tinygemm,
     not used where the launch table chose it), and ``w4a16-tinygemm``: every layer in tinygemm's layout
     (``INFERNEO_INT4_LAYOUT=tinygemm``), for the A/Bs in the same run;
  3. ``gptfast``: gpt-fast (``scratch/gpt-fast``: its ``model.py``, ``generate.py``, ``quantize.py``, ``tokenizer.py``, carried with
     the call) on the same architecture with random weights, its int8 weight-only mode and bf16: the batch-1
     decode step at context about 1,064 (``torch.compile(mode="reduce-overhead")``).

``--ab LABEL@BASE@VAR=VALUE@...``: the section ``BASE`` again with environment switches set (read where its CUDA
graphs are captured), for same-process A/Bs; two bases exist only there: ``f16`` (the dense model in float16) and
``w4a16-f16+fp8kv`` (``w4a16+fp8kv`` with float16 activations, the dtype AWQ checkpoints are saved in).
``--async-workloads``: W1/W2 with asynchronous scheduling, the engine's default on CUDA (without it they run
synchronously, as in every call before 2026-12-04 evening).

``--profile bf16,fp8``: after a variant's decode steps, PyTorch's profiler over a few more steps at batch 1 and 32:
GPU time per step by kernel kind and the top kernels (where a step's time goes besides the weights).

Writes ``quant_suite.json`` and ``quant_suite.log`` to ``--out`` (default ``$OUT``). ``--smoke`` runs the engine
sections with a tiny model on CPU, and gpt-fast's path eagerly with a tiny ``ModelArgs`` when ``scratch/gpt-fast``
is there (the numbers mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
from floors import sync, timed  # noqa: E402
from h100_suite import (  # noqa: E402
    Suite,
    free_memory,
    greedy,
    run_workloads,
    sec_ceilings,
    sec_inferneo_workload,
    step_latency,
)

from inferneo import LLM  # noqa: E402
from inferneo.model_executor import arch_presets  # noqa: E402
from inferneo.model_executor.arch_presets import MARKER_FILE, materialize_preset, preset_config  # noqa: E402

FULL = dict(
    preset="llama-2-7b", device="cuda", deadline=560.0,
    w1=(256, 1024, 128), w2=(256, 128, 1024), decode_batches=(1, 32), decode_ctx=1024, decode_steps=32,
    engine=dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9),
    gptfast_ctx=1024, gptfast_tokens=(8, 72), gptfast_max_seq=2048, gptfast_args=None, profile_batches=(1, 32),
)
SMOKE = dict(
    FULL, preset="smoke-llama", device="cpu", deadline=400.0,
    w1=(4, 32, 4), w2=(4, 8, 16), decode_batches=(1, 4), decode_ctx=32, decode_steps=3, profile_batches=(1, 4),
    gptfast_ctx=32, gptfast_tokens=(2, 4), gptfast_max_seq=256,
    gptfast_args=dict(block_size=256, vocab_size=512, n_layer=2, n_head=4, dim=256),
    engine=dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_memory=32 * 2**20),
)
SMOKE_CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512)
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def model_folder(s: Suite, quantization_config: dict | None) -> str:
    """The preset's folder (a copy with ``quantization_config`` added when given; the tiny smoke model on CPU)."""
    preset = s.cfg["preset"]
    folder = materialize_preset(preset, Path(s.out_dir) / "models" / ("awq" if quantization_config else "plain"))
    config = preset_config(preset)
    if quantization_config:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    assert (folder / MARKER_FILE).is_file()
    return str(folder)


def build(s: Suite, label: str, **kw) -> tuple[LLM, dict]:
    awq = kw.pop("awq", False)
    dtype = kw.pop("dtype", "bfloat16")  # the activations' (and unquantized weights') dtype
    engine_kw = dict(s.cfg["engine"], **kw)
    model = model_folder(s, AWQ_CONFIG if awq else None)
    llm, seconds = timed(lambda: LLM(model, load_format="dummy", dtype=dtype, device=s.cfg["device"],
                                     **engine_kw))
    eng = llm.engine
    weight_bytes = sum(t.numel() * t.element_size() for t in (*eng.runner.model.parameters(),
                                                               *eng.runner.model.buffers()))
    kinds = sorted({type(m).__name__ for m in eng.runner.model.modules()})
    layouts: dict[str, int] = {}
    for module in eng.runner.model.modules():  # the 4-bit layers' layouts (Triton rows, tinygemm)
        for block in getattr(module, "int4_blocks", None) or ():
            layouts[type(block).__name__] = layouts.get(type(block).__name__, 0) + 1
    if layouts:
        kinds.append("int4 layouts " + ", ".join(f"{k} x{v}" for k, v in sorted(layouts.items())))
    s.log(f"{label}: engine ready in {seconds:.1f} s, weights {weight_bytes / 2**30:.2f} GiB, KV "
          f"{eng.kv_capacity_tokens} tokens, backend {eng.runner.backend.name}; modules: {', '.join(kinds)}")
    return llm, {"build_s": seconds, "weight_gib": weight_bytes / 2**30, "kv_tokens": eng.kv_capacity_tokens,
                 "modules": kinds, **{k: v for k, v in engine_kw.items() if k != "engine"}}


def kernel_profile(llm: LLM, s: Suite, label: str, batch: int, steps: int = 8) -> dict:
    """GPU time per decode step by kernel kind and the top kernels, over ``steps`` profiled steps of ``batch``
    requests at the decode context (``tp_profile.kind_of`` groups them)."""
    from torch.profiler import ProfilerActivity, profile
    from tp_profile import _timeline, kind_of

    eng = llm.engine
    ctx = s.cfg.get("profile_ctx") or s.cfg["decode_ctx"]
    ids = [eng.add_request(f"prof-{label}-{batch}-{i}-{time.monotonic_ns()}", p, greedy(3 * steps + 16))
           for i, p in enumerate(s.prompts(batch, ctx - 1, eng.vocab_size))]
    try:
        while len(eng.scheduler.waiting) or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
            eng.step()
        for _ in range(2):
            eng.step()
        sync()
        on_gpu = torch.cuda.is_available()  # (the CPU smoke run profiles the CPU ops instead)
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng.step()
            sync()
        host = {}
        if on_gpu:  # the same steps unprofiled: wall time a step, and how much of it the host waits for the GPU
            try:
                from tp_profile import _time_driver

                host = _time_driver(eng, steps)
                s.log(f"{label} batch {batch} ctx {ctx} host: " + ", ".join(f"{k} {v:.2f}" for k, v in host.items())
                      + f"; wall {host['launch_ms'] + host['resolve_ms'] + host['other_ms']:.2f} ms/step")
            except Exception as exc:  # noqa: BLE001 - a figure for the record, not needed by the run
                s.log(f"{label} batch {batch} host timing failed: {exc!r}")
    finally:
        for request_id in ids:
            eng.abort_request(request_id)
    by_kind: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if on_gpu \
            else event.self_cpu_time_total
        if us <= 0 or (on_gpu and event.key.startswith(("aten::", "cuda"))):
            continue
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + us / steps
        kernels.append({"us_per_step": us / steps, "calls_per_step": event.count / steps, "name": event.key[:100]})
    kernels.sort(key=lambda k: -k["us_per_step"])
    timeline = _timeline(prof, steps)
    critical = []
    if on_gpu:  # per kernel name: the time it adds to the end of the stream (kernels overlap under PDL)
        from kernel_timeline import by_name, critical_path, kernel_events

        critical = by_name(critical_path(kernel_events(prof)), steps)
        s.log(f"{label} batch {batch} critical path, us/step (calls/step): " + ", ".join(
            f"{r['kernel'][:40]} {r['added_us']:.1f} ({r['calls']:.0f})" for r in critical[:12]))
    s.log(f"{label} batch {batch} profile: GPU busy {timeline.get('busy_ms', 0):.3f} ms/step, idle "
          f"{timeline.get('idle_ms', 0):.3f} ms/step, {timeline.get('kernels_per_step', 0):.0f} kernels/step; " +
          ", ".join(f"{k} {v / 1e3:.3f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for k in kernels[:14]:
        s.log(f"    {k['us_per_step']:8.1f} us/step {k['calls_per_step']:5.1f}/step  {k['name']}")
    return {"batch": batch, "context": ctx, "by_kind_us": by_kind, "timeline": timeline, "top_kernels": kernels[:30],
            "critical_path": critical[:30], "host": host}


def sec_variant(s: Suite, label: str, workloads: tuple[str, ...] = ("w1", "w2"),
                batches: tuple[int, ...] | None = None, **kw) -> dict:
    llm, info = build(s, label, **kw)
    out: dict = {"engine": info, "decode": []}
    try:
        step_latency(llm, s, 2, 32, 2)  # warm-up
        for batch in batches or s.cfg["decode_batches"]:
            row = step_latency(llm, s, batch, s.cfg["decode_ctx"], s.cfg["decode_steps"])
            out["decode"].append(row)
            s.log(f"{label} decode batch {batch:3d} ({row['running']} running) ctx {row['context']:.0f}: "
                  f"{row['step_ms']:.2f} ms/step")
        s.write()
        if label in s.cfg.get("profile", ()):
            out["profile"] = [kernel_profile(llm, s, label, batch) for batch in s.cfg["profile_batches"]]
            s.write()
        measure = sec_inferneo_workload
        if s.cfg.get("async_workloads"):  # the engine's default on CUDA (core_builder), as h100_suite's w*_async
            def measure(s, llm, name):
                return sec_inferneo_workload(s, llm, name, async_scheduling=True)
        run_workloads(s, llm, out, workloads, measure, min_left=45)
    finally:
        llm.shutdown()
        del llm
        free_memory()
    return out


def sec_with_env(s: Suite, label: str, env: dict[str, str], batches: tuple[int, ...] | None = None,
                 workloads: tuple[str, ...] = (), **kw) -> dict:
    """A variant's decode steps (and ``workloads``) with environment switches set while its engine is built and run
    (restored after), for A/Bs in the same run."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        from inferneo.kernels import triton_fp8_gemv

        triton_fp8_gemv._tuned.cache_clear()  # (INFERNEO_FP8_GEMV_CONFIGS: the tiling file is read once)
        return sec_variant(s, label, workloads=workloads, batches=batches, **kw)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        triton_fp8_gemv._tuned.cache_clear()


def sec_fp8_without_gemv(s: Suite) -> dict:
    """The FP8 decode steps with the weight-only GEMV switched off (``INFERNEO_FP8_GEMV=0``: every row count through
    per-token activation quantization + ``torch._scaled_mm``), for the A/B in the same run."""
    return sec_with_env(s, "fp8-w8a8", {"INFERNEO_FP8_GEMV": "0"}, quantization="fp8")


def sec_fp8_tiles(s: Suite, tiles: str) -> dict:
    """The FP8 batch-1 step with the shipped tiling file's entries replaced by ``tiles`` (JSON: ``{"N,K,BLOCK_M":
    entry}``; ``"norm N,K"``: the norm-fused GEMV's ``norm_shapes`` entry), through ``INFERNEO_FP8_GEMV_CONFIGS``."""
    from inferneo.kernels import triton_fp8_gemv

    table = json.loads(triton_fp8_gemv.CONFIG_FILE.read_text())
    for key, entry in json.loads(tiles).items():  # "norm N,K": the norm-fused GEMV's tiling
        if key.startswith("norm "):
            table.setdefault("norm_shapes", {})[key.removeprefix("norm ")] = entry
        else:
            table["shapes"][key] = entry
    path = Path(s.out_dir) / "fp8_gemv_configs-variant.json"
    path.write_text(json.dumps(table, indent=1))
    out = sec_with_env(s, "fp8-tiles", {"INFERNEO_FP8_GEMV_CONFIGS": str(path)}, batches=(1,), quantization="fp8")
    out["tiles"] = json.loads(tiles)
    return out


# ---- gpt-fast --------------------------------------------------------------------------------------------------


def _gptfast_step_ms(s: Suite, int8: bool) -> float:
    """gpt-fast's batch-1 decode step: (time for the long run - time for the short run) / extra tokens.

    Each mode compiles gpt-fast's own ``decode_one_token`` afresh (``torch._dynamo.reset()`` first, so the second
    mode neither wraps the first mode's compiled function nor keeps its graphs). With ``--smoke`` the same path runs
    eagerly on CPU with a tiny ``ModelArgs`` (``torch.compiler.set_stance("force_eager")``), to check the code."""
    sys.path.insert(0, str(HERE.parents[1] / "scratch" / "gpt-fast"))
    import generate as gf  # gpt-fast's module, carried in scratch/
    from model import ModelArgs, Transformer
    from quantize import WeightOnlyInt8QuantHandler

    device = s.cfg["device"]
    on_gpu = device == "cuda"
    if not hasattr(gf, "_eager_decode_one_token"):
        gf._eager_decode_one_token = gf.decode_one_token
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = ModelArgs(**s.cfg["gptfast_args"]) if s.cfg.get("gptfast_args") else ModelArgs.from_name("7B")
    with torch.device(device):
        model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.to(torch.bfloat16)
    if int8:
        handler = WeightOnlyInt8QuantHandler(model)
        state = handler.create_quantized_state_dict()
        model = handler.convert_for_runtime()
        model.load_state_dict(state, assign=True)
        model = model.to(device)
        del state
    model.eval()
    with torch.device(device):
        model.setup_caches(max_batch_size=1, max_seq_length=s.cfg["gptfast_max_seq"])
    gf.decode_one_token = torch.compile(gf._eager_decode_one_token, mode="reduce-overhead", fullgraph=True)
    ctx = s.cfg["gptfast_ctx"]
    prompt = torch.randint(0, args.vocab_size, (1, ctx), device=device)

    def run(n: int) -> float:
        pos = torch.arange(ctx, device=device)
        with torch.no_grad():
            first = gf.prefill(model, prompt, pos, temperature=0.0)
            sync()
            start = time.perf_counter()
            tokens, _ = gf.decode_n_tokens(model, first.view(1, -1), torch.tensor([ctx], device=device), n,
                                           temperature=0.0)
            sync()
        assert len(tokens) == n and all(0 <= int(t) < args.vocab_size for t in tokens)
        return time.perf_counter() - start

    short, long = s.cfg["gptfast_tokens"]
    stance = contextlib.nullcontext() if on_gpu else torch.compiler.set_stance("force_eager")
    with stance:
        run(short)  # compile and warm up
        run(long)
        times = {n: min(run(n) for _ in range(2)) for n in (short, long)}
    gf.decode_one_token = gf._eager_decode_one_token
    model = None  # (the closure above shares this cell: the weights go with it)
    torch._dynamo.reset()
    free_memory()
    return (times[long] - times[short]) / (long - short) * 1e3


def sec_gptfast(s: Suite) -> dict:
    out = {}
    for label, int8 in (("int8", True), ("bf16", False)):
        if s.left() < 150:
            out[label] = {"status": f"skipped ({s.left():.0f} s left)"}
            continue
        out[label] = {"step_ms": _gptfast_step_ms(s, int8), "context": s.cfg["gptfast_ctx"] + 40}
        s.log(f"gpt-fast {label} batch-1 decode step: {out[label]['step_ms']:.2f} ms")
        s.write()
    return out


# ---- summary -----------------------------------------------------------------------------------------------


def summarize(s: Suite) -> None:
    r = s.results.get("sections", {})

    def step(label: str, batch: int) -> float | None:
        rows = (r.get(label) or {}).get("decode") or []
        return next((row["step_ms"] for row in rows if row["batch"] == batch), None)

    def tps(label: str, name: str) -> float | None:
        return ((r.get(label) or {}).get(name) or {}).get("output_tok_per_s")

    lines, checks = [], {}
    for name in ("w1", "w2"):
        base, fp8 = tps("bf16", name), tps("fp8", name)
        if base and fp8:
            checks[f"fp8_{name}"] = {"ratio": fp8 / base, "need": ">= 1.4", "pass": fp8 / base >= 1.4}
    kv_labels = ["fp8+fp8kv"] + sorted(label for label in r if label.startswith(("fp8+fp8kv-w", "fp8+fp8kv-pre")))
    for label in kv_labels:  # the FP8 KV cache beside FP8 weights: additional rows, not the FP8 figure
        for name in ("w1", "w2"):
            base, both = tps("bf16", name), tps(label, name)
            if base and both:
                checks[f"{label}_{name}"] = {"ratio": both / base, "need": ">= 1.4 (FP8 weights + FP8 KV cache)",
                                             "pass": both / base >= 1.4}
    for label, batch, need in (("fp8", 1, 0.6), ("w4a16", 1, 0.4), ("w4a16", 32, 0.6), ("w4a16-rows", 1, 0.4),
                               ("w4a16-rows", 32, 0.6), ("w4a16-tinygemm", 1, 0.4), ("w4a16-tinygemm", 32, 0.6),
                               *((label, 1, 0.6) for label in kv_labels),
                               ("w4a16+fp8kv", 1, 0.4), ("w4a16+fp8kv", 32, 0.6)):
        base, ours = step("bf16", batch), step(label, batch)
        if base and ours:
            checks[f"{label}_b{batch}"] = {"ratio": ours / base, "need": f"<= {need}", "pass": ours / base <= need}
    for label in r:  # the --ab sections: against bf16 of the same run (information, not the figures)
        base_b1, ours_b1 = step("bf16", 1), step(label, 1)
        if label not in ("bf16", "fp8", *kv_labels) and base_b1 and ours_b1:
            lines.append(f"{label}: batch 1 {ours_b1:.3f} ms = {ours_b1 / base_b1:.3f}x bf16"
                         + (f"; W2 {tps(label, 'w2'):.0f} tok/s = {tps(label, 'w2') / tps('bf16', 'w2'):.3f}x bf16"
                            if tps(label, "w2") and tps("bf16", "w2") else ""))
    gptfast = ((r.get("gptfast") or {}).get("int8") or {}).get("step_ms")
    fp8_b1 = step("fp8", 1)
    if gptfast and fp8_b1:
        checks["fp8_vs_gptfast_int8"] = {"speedup": gptfast / fp8_b1, "need": ">= 1.5", "pass": gptfast / fp8_b1 >= 1.5}
    for key, c in checks.items():
        value = c.get("ratio", c.get("speedup"))
        lines.append(f"{key}: {value:.2f} (need {c['need']}): {'PASS' if c['pass'] else 'FAIL'}")
    s.results["checks"] = checks
    s.log("=" * 100)
    for line in lines:
        s.log("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, to check the script")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated (e.g. gptfast,fp8-kv)")
    parser.add_argument("--profile", default="", help="variants whose decode steps are also profiled (e.g. bf16,fp8)")
    parser.add_argument("--fp8-tiles", default="", help="fp8-tiles: FP8 tiling entries replaced (JSON), batch 1")
    parser.add_argument("--fused-reduce", default="", metavar="VALUE",
                        help="also bf16-reduceVALUE and fp8-reduceVALUE: batch 1 and 4 with "
                        "INFERNEO_DECODE_FUSED_REDUCE=VALUE (1: merged in the attention kernel; 0: two kernels)")
    parser.add_argument("--decode-batches", default="",
                        help="batch sizes of the decode-step timings, comma-separated (default: 1,32)")
    parser.add_argument("--fp8kv-widen", default="",
                        help="also fp8+fp8kv-wVALUE per comma-separated value: FP8 weights + FP8 KV cache with "
                        "INFERNEO_FP8_KV_WIDEN=VALUE (decode steps and workloads)")
    parser.add_argument("--fp8kv-prewait", default="",
                        help="also fp8+fp8kv-preVALUE: FP8 weights + FP8 KV cache with INFERNEO_PREWAIT_LOADS=VALUE")
    parser.add_argument("--ab", action="append", default=[], metavar="LABEL@BASE@VAR=VALUE@...",
                        help="also LABEL: section BASE (bf16, fp8, fp8+fp8kv, w4a16, w4a16+fp8kv, f16, "
                        "w4a16-f16+fp8kv) again with the environment variables set (none: the base again), decode steps at --ab-batches and --ab-workloads; repeatable, "
                        "run in the order given after the base sections")
    parser.add_argument("--ab-batches", default="1", help="decode batches of the --ab sections")
    parser.add_argument("--ab-workloads", default="", help="workloads of the --ab sections (e.g. w2)")
    parser.add_argument("--async-workloads", action="store_true",
                        help="run W1/W2 with asynchronous scheduling, the engine's default on CUDA (without it they "
                        "run synchronously, as every quant_suite call before 2026-12-04 17:00 UTC did)")
    parser.add_argument("--profile-batches", default="", help="batches of --profile (default 1,32)")
    parser.add_argument("--profile-ctx", type=int, default=0, help="context of --profile (default: the decode one)")
    parser.add_argument("--workloads", default="w1,w2",
                        help="throughput workloads per weight format after its decode steps (empty: decode only)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.deadline:
        cfg["deadline"] = args.deadline
    cfg["profile"] = tuple(filter(None, args.profile.split(",")))
    if args.decode_batches:
        cfg["decode_batches"] = tuple(int(b) for b in args.decode_batches.split(","))
    cfg["profile_ctx"] = args.profile_ctx
    cfg["async_workloads"] = args.async_workloads
    if args.profile_batches:
        cfg["profile_batches"] = tuple(int(b) for b in args.profile_batches.split(","))
    s = Suite(Path(args.out), cfg, name="quant_suite")
    if args.smoke:
        arch_presets.PRESETS["smoke-llama"] = preset_config("llama-2-7b", **SMOKE_CONFIG)
    sections = s.results["sections"]
    s.section("ceilings", lambda: sec_ceilings(s))
    workloads = tuple(filter(None, args.workloads.split(",")))
    fr = args.fused_reduce
    widens = tuple(filter(None, args.fp8kv_widen.split(",")))
    plan = [
        ("bf16", lambda: sec_variant(s, "bf16", workloads), 20 + 50 * len(workloads)),
        ("fp8", lambda: sec_variant(s, "fp8", workloads, quantization="fp8"), 70 if workloads else 15),
        ("fp8-w8a8", lambda: sec_fp8_without_gemv(s), 35),
        ("fp8-nonorm", lambda: sec_with_env(s, "fp8-nonorm", {"INFERNEO_FP8_NORM_GEMV": "0"}, batches=(1,),
                                            quantization="fp8"), 10),
        ("fp8-tiles", lambda: sec_fp8_tiles(s, args.fp8_tiles), 10),
        (f"bf16-reduce{fr}", lambda: sec_with_env(s, f"bf16-reduce{fr}", {"INFERNEO_DECODE_FUSED_REDUCE": fr},
                                                   batches=(1, 4)), 15),
        (f"fp8-reduce{fr}", lambda: sec_with_env(s, f"fp8-reduce{fr}", {"INFERNEO_DECODE_FUSED_REDUCE": fr},
                                                  batches=(1, 4), quantization="fp8"), 10),
        ("w4a16", lambda: sec_variant(s, "w4a16", workloads, awq=True), 100 if workloads else 45),
        ("w4a16-rows", lambda: sec_with_env(s, "w4a16-rows", {"INFERNEO_INT4_LAYOUT": "rows"}, awq=True), 45),
        ("w4a16-tinygemm", lambda: sec_with_env(s, "w4a16-tinygemm", {"INFERNEO_INT4_LAYOUT": "tinygemm"},
                                                awq=True), 60),
        ("fp8-kv", lambda: sec_variant(s, "fp8-kv", workloads=(), batches=(32,), kv_cache_dtype="fp8"), 60),
        ("fp8+fp8kv", lambda: sec_variant(s, "fp8+fp8kv", workloads, quantization="fp8", kv_cache_dtype="fp8"), 40),
        *[(f"fp8+fp8kv-w{w}", lambda w=w: sec_with_env(s, f"fp8+fp8kv-w{w}", {"INFERNEO_FP8_KV_WIDEN": w},
                                                       workloads=workloads, quantization="fp8", kv_cache_dtype="fp8"),
           40) for w in widens],
        *[(f"fp8+fp8kv-pre{v}", lambda v=v: sec_with_env(s, f"fp8+fp8kv-pre{v}", {"INFERNEO_PREWAIT_LOADS": v},
                                                         workloads=workloads, quantization="fp8", kv_cache_dtype="fp8"),
           40) for v in filter(None, [args.fp8kv_prewait])],
        ("w4a16+fp8kv", lambda: sec_variant(s, "w4a16+fp8kv", workloads=(), awq=True, kv_cache_dtype="fp8"), 40),
        ("gptfast", lambda: sec_gptfast(s), 150),
    ]
    base_kw = {"bf16": {}, "fp8": {"quantization": "fp8"},
               "fp8+fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}, "w4a16": {"awq": True},
               "w4a16+fp8kv": {"awq": True, "kv_cache_dtype": "fp8"}, "f16": {"dtype": "float16"},
               "w4a16-f16+fp8kv": {"awq": True, "kv_cache_dtype": "fp8", "dtype": "float16"}}
    ab_batches = tuple(int(b) for b in args.ab_batches.split(","))
    ab_workloads = tuple(filter(None, args.ab_workloads.split(",")))
    for spec in args.ab:
        label, _, rest = spec.partition("@")
        base, *pairs = rest.split("@")
        bad = [pair for pair in pairs if pair and pair != "none" and "=" not in pair]
        if base not in base_kw or bad:
            parser.error(f"--ab {spec!r}: want LABEL@BASE@VAR=VALUE@... with BASE among {', '.join(base_kw)}"
                         + (f"; not VAR=VALUE: {', '.join(bad)}" if bad else ""))
        env = dict(pair.split("=", 1) for pair in pairs if pair and pair != "none")
        wl = tuple(filter(None, env.pop("workloads").split(","))) if "workloads" in env else ab_workloads
        plan.append((label, lambda label=label, base=base, env=env, wl=wl: sec_with_env(
            s, label, env, batches=ab_batches, workloads=wl, **base_kw[base]), 12 + 35 * len(wl)))
    for name, run, min_left in plan:
        if name in skip or (name == "fp8-tiles" and not args.fp8_tiles) or \
                (name.startswith(("bf16-reduce", "fp8-reduce")) and not fr) or \
                (name == "gptfast" and not (HERE.parents[1] / "scratch" / "gpt-fast").is_dir()):
            continue
        if s.left() < min_left:
            s.log(f"-- {name}: skipped ({s.left():.0f} s left)")
            sections[name] = {"status": "skipped"}
            continue
        s.section(name, run)
    summarize(s)
    print(f"results: {s.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
