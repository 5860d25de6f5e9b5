#!/usr/bin/env python3
"""Tensor parallelism on a machine of several GPUs: checks and timings in one run.

Sections (each timed and in its own try/except; results written after every one):
  1. ceilings of GPU 0 (copy bandwidth, bf16 matmul rate); a TP=N floor assumes N such GPUs sharing the work;
  2. equality: a small random Llama (float32) through the whole engine, greedy tokens at TP=1 and each TP=N;
  3. for each TP size: build ``preset:MODEL`` (bf16, dummy weights), then
     - repeat: a greedy batch of 64 run twice must give equal tokens; 16 of its prompts alone are compared too
     - single: greedy tokens of 4 prompts run one at a time (batch-1 steps), kept to compare runs;
     - W3: decode step at batch 1, 32 and 128 with 1024 tokens of context (CUDA graphs);
     - W1: 256 prompts x 1024 random tokens -> 128 tokens, ``ignore_eos``;
  4. serve (``--serve``): ``inferneo serve`` on the model at the largest TP size, with a small text tokenizer
     (the preset has none), answering the guide's two basic examples through ``InferneoClient``.

Usage on a 2-GPU machine:  ``python3 benchmarks/gpu/tp_suite.py --sizes 1,2``
on a 4-GPU machine (70B):  ``python3 benchmarks/gpu/tp_suite.py --model llama-2-70b --sizes 4 --serve``
``--smoke`` runs it on CPU over gloo with a tiny preset (numbers mean nothing; it checks the script).
Writes ``tp_suite.json`` and ``tp_suite.log`` to ``--out`` (default ``$OUT``, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from floors import Ceilings, decode_step_floor, measure_ceilings, model_shape, timed, workload_floor  # noqa: E402
from h100_suite import Suite, free_memory, generate_ids, match_lengths, step_latency  # noqa: E402

from inferneo import LLM  # noqa: E402
from inferneo.model_executor import arch_presets  # noqa: E402
from inferneo.model_executor.arch_presets import preset_config  # noqa: E402

FULL = dict(device="cuda", deadline=560.0, w1=(256, 1024, 128), w3_batches=(1, 32, 128), w3_ctx=1024, w3_steps=32,
            repeat=(16, 64, 32), repeat_lengths=(16, 200, 600), equality=(16, 32), stall_s=240, equality_stall_s=110,
            engine=dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
                        gpu_memory_utilization=0.92),
            tiny=dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, vocab_size=4096))
SMOKE = dict(FULL, device="cpu", deadline=600.0, w1=(8, 64, 8), w3_batches=(1, 4), w3_ctx=64, w3_steps=4,
             repeat=(4, 8, 6), repeat_lengths=(8, 60, 120), equality=(4, 8), stall_s=300, equality_stall_s=120,
             engine=dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512, kv_cache_memory=64 * 2**20),
             tiny=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=384))


class Watchdog:
    """Should a section stall: write the driver's stacks to ``stacks.txt``, have every child print its own
    (tensor-parallel workers dump their stacks on SIGUSR1), keep the results so far, kill the children, exit 3."""

    def __init__(self, s: Suite) -> None:
        self.s = s
        self.deadline: float | None = None
        self.what = ""
        threading.Thread(target=self._loop, name="tp-suite-watchdog", daemon=True).start()

    def arm(self, what: str, seconds: float | None = None) -> None:
        self.what = what
        self.deadline = time.monotonic() + (seconds or self.s.cfg["stall_s"])

    def _loop(self) -> None:
        while True:
            time.sleep(1.0)
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._fire()

    def _fire(self) -> None:
        import psutil

        self.s.log(f"STALL: {self.what} made no progress in time; driver stacks in stacks.txt, children's below")
        with open(self.s.out_dir / "stacks.txt", "w", encoding="utf-8") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGUSR1)
        time.sleep(5)
        self.s.write()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(3)


def scaled(c: Ceilings, tp: int) -> Ceilings:
    """The ceilings of ``tp`` GPUs sharing one job evenly (communication not counted: it is a floor)."""
    return Ceilings(c.copy_bytes_per_s * tp, c.matmul_flops_per_s * tp)


def sec_equality(s: Suite, sizes: list[int], enforce_eager: bool) -> dict:
    from inferneo.testing import make_tiny_checkpoint

    t = s.cfg["tiny"]
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tp-tiny", "llama", vocab_size=t["vocab_size"],
                                hidden_size=t["hidden_size"], num_layers=t["num_layers"], num_heads=t["num_heads"],
                                num_kv_heads=t["num_kv_heads"])
    n, tokens = s.cfg["equality"]
    lengths = s.rng.integers(8, 100, size=n)
    prompts = [s.rng.integers(3, t["vocab_size"] - 10, size=int(k)).tolist() for k in lengths]
    outputs = {}
    for tp in sorted({1, *sizes}):
        llm = LLM(str(path), dtype="float32", device=s.cfg["device"], tensor_parallel_size=tp, max_model_len=512,
                  kv_cache_memory=2**28, max_num_seqs=32, enforce_eager=enforce_eager)
        s.log(f"  equality TP={tp}: engine built (enforce_eager={enforce_eager}; small all-reduces through "
              f"{all_reduce_path(llm)})")
        outputs[tp] = generate_ids(llm, prompts, tokens)
        llm.shutdown()
        s.log(f"  equality TP={tp}: generated and shut down")
        del llm
        free_memory()
    result = {}
    for tp in sizes:
        if tp == 1:
            continue
        matches = match_lengths(outputs[1], outputs[tp])
        equal = outputs[1] == outputs[tp]
        s.log(f"TP={tp} vs TP=1 greedy (fp32, {n} prompts x {tokens} tokens, {'eager' if enforce_eager else 'graphs'})"
              f": {'EQUAL' if equal else 'DIFFERENT'}; "
              f"match lengths {matches}")
        result[f"tp{tp}"] = {"equal": equal, "match_lengths": matches}
    return result


def all_reduce_path(llm: LLM) -> str:
    """How the engine's driver all-reduces small messages: "peer memory" or "NCCL"."""
    peer = getattr(getattr(getattr(llm.engine.runner, "driver", None), "tp", None), "peer", None)
    return "peer memory" if peer is not None else "NCCL"


def build(s: Suite, model: str, tp: int) -> LLM:
    llm, seconds = timed(lambda: LLM(f"preset:{model}", load_format="dummy", dtype="bfloat16", device=s.cfg["device"],
                                     tensor_parallel_size=tp, **s.cfg["engine"]))
    eng = llm.engine
    s.log(f"TP={tp}: small all-reduces through {all_reduce_path(llm)}")
    s.log(f"TP={tp}: engine ready in {seconds:.1f} s: KV {eng.kv_cache.num_blocks} blocks "
          f"({eng.kv_capacity_tokens} tokens), backend {eng.runner.backend.name}, graph buckets "
          f"{eng.runner.decode_buckets[-1:] if eng.runner.decode_buckets else 'none'}")
    return llm


def sec_repeat(s: Suite, llm: LLM) -> dict:
    """The same greedy batch run twice gives the same tokens (run-to-run determinism). Also reported: the same
    prompts alone vs inside a larger batch, which bf16 need not keep equal (other batch shapes round otherwise)."""
    n, batch, tokens = s.cfg["repeat"]
    vocab = llm.engine.vocab_size
    low, high, high_others = s.cfg["repeat_lengths"]
    prompts = [s.rng.integers(100, vocab - 100, size=int(k)).tolist() for k in s.rng.integers(low, high, size=n)]
    others = [s.rng.integers(100, vocab - 100, size=int(k)).tolist()
              for k in s.rng.integers(low, high_others, size=batch - n)]
    half = len(others) // 2
    mixed_prompts = others[:half] + prompts + others[half:]
    kv = llm.engine.kv_cache
    kv.enable_prefix_caching = False  # the second run must compute what the first did, not reuse its blocks
    try:
        first = generate_ids(llm, mixed_prompts, tokens)
        second = generate_ids(llm, mixed_prompts, tokens)
        alone = generate_ids(llm, prompts, tokens)
    finally:
        kv.enable_prefix_caching = True
    runs_equal = first == second
    composition = match_lengths(alone, first[half: half + n])
    s.log(f"repeat: a batch of {batch} prompts x {tokens} tokens, twice: {'EQUAL' if runs_equal else 'DIFFERENT'} "
          f"(match lengths {match_lengths(first, second)}); {n} of them alone vs in the batch: match lengths "
          f"{composition}")
    return {"runs_equal": runs_equal, "run_match_lengths": match_lengths(first, second),
            "alone_vs_batch_match_lengths": composition}


def sec_single(s: Suite, llm: LLM) -> dict:
    """Greedy tokens of a few prompts, each run alone (batch-1 decode steps, where the pushed all-reduce path
    applies), kept in the results so two runs (e.g. ``INFERNEO_PEER_PUSH=0`` and the default) can be compared."""
    vocab = llm.engine.vocab_size
    rng = np.random.default_rng(7)  # the same prompts in every run
    longest = min(600, s.cfg["engine"]["max_model_len"] - 40)
    prompts = [rng.integers(100, vocab - 100, size=int(k)).tolist() for k in rng.integers(16, longest, size=4)]
    kv = llm.engine.kv_cache
    kv.enable_prefix_caching = False
    try:
        tokens = [generate_ids(llm, [p], 32)[0] for p in prompts]
    finally:
        kv.enable_prefix_caching = True
    s.log(f"single: {len(prompts)} prompts alone x 32 tokens; first tokens {[t[:4] for t in tokens]}")
    return {"tokens": tokens}


def sec_w3(s: Suite, llm: LLM, model: str, tp: int) -> dict:
    shape = model_shape(preset_config(model))
    ctx, steps = s.cfg["w3_ctx"], s.cfg["w3_steps"]
    step_latency(llm, s, 2, 32, 2)  # warm-up
    rows = []
    core = llm.engine.core
    default = core.async_scheduling
    for batch in s.cfg["w3_batches"]:
        for async_on in (False, True):
            core.async_scheduling = async_on  # switched between measurements, with nothing in flight
            row = step_latency(llm, s, batch, ctx, steps)
            floor = decode_step_floor(shape, row["running"], row["context"], scaled(s.ceilings, tp))
            row.update(tp=tp, mode="async" if async_on else "sync", floor_ms=floor * 1e3,
                       ratio=row["step_ms"] / (floor * 1e3))
            rows.append(row)
            s.log(f"W3 TP={tp} batch {batch:3d} ({row['running']} running) ctx {row['context']:.0f} {row['mode']:5s}: "
                  f"{row['step_ms']:.2f} ms/step, floor {row['floor_ms']:.2f} ms, ratio {row['ratio']:.2f}")
    core.async_scheduling = default
    return {"rows": rows}


def sec_w1(s: Suite, llm: LLM, model: str, tp: int) -> dict:
    """W1 with the engine's default scheduling and, at TP > 1, with asynchronous scheduling as well."""
    core = llm.engine.core
    default = core.async_scheduling
    result = _w1_once(s, llm, model, tp)
    if tp > 1 and not default:
        core.async_scheduling = True
        result["async"] = _w1_once(s, llm, model, tp)
        core.async_scheduling = default
    return result


def _w1_once(s: Suite, llm: LLM, model: str, tp: int) -> dict:
    n, plen, olen = s.cfg["w1"]
    vocab = llm.engine.vocab_size
    prompts = s.prompts(n, plen, vocab)
    generate_ids(llm, s.prompts(2, plen, vocab), 4)  # warm-up at this prompt length
    outputs, seconds = timed(lambda: generate_ids(llm, prompts, olen))
    produced = sum(len(o) for o in outputs)
    capacity = llm.engine.kv_capacity_tokens
    concurrency = max(1, min(n, s.cfg["engine"]["max_num_seqs"], capacity // (plen + olen)))
    floor = workload_floor(model_shape(preset_config(model)), n, plen, olen, concurrency, scaled(s.ceilings, tp))
    tps = produced / seconds
    mode = "async" if llm.engine.core.async_scheduling else "sync"
    s.log(f"W1 TP={tp} {mode}: {n} prompts x {plen} -> {olen}: {seconds:.1f} s, {tps:.0f} output tok/s "
          f"(floor {floor['floor_output_tok_per_s']:.0f} tok/s at concurrency {concurrency})")
    return {"tp": tp, "seconds": seconds, "output_tokens": produced, "output_tok_per_s": tps, **floor}


def run_size(s: Suite, dog: Watchdog, model: str, tp: int, skip: frozenset[str] = frozenset(),
             label: str = "") -> None:
    """Build the engine at TP=``tp`` and run the per-size sections; ``label`` suffixes their names."""
    if "engine" in skip:
        return
    holder: dict = {}
    dog.arm(f"engine_tp{tp}{label}")
    s.section(f"engine_tp{tp}{label}", lambda: holder.update(llm=build(s, model, tp)), min_left=90)
    if "llm" not in holder:
        return
    llm = holder.pop("llm")
    for name, fn in (("repeat", lambda: sec_repeat(s, llm)), ("single", lambda: sec_single(s, llm)),
                     ("w3", lambda: sec_w3(s, llm, model, tp)),
                     ("w1", lambda: sec_w1(s, llm, model, tp))):
        if name in skip:
            continue
        dog.arm(f"{name}_tp{tp}{label}")
        s.section(f"{name}_tp{tp}{label}", fn, min_left=40)
    dog.arm(f"shutdown_tp{tp}", 60)
    started = time.perf_counter()
    llm.shutdown()
    s.log(f"TP={tp}: shut down in {time.perf_counter() - started:.1f} s")
    llm = None
    free_memory()


def sec_serve(s: Suite, model: str, tp: int) -> dict:
    """``inferneo serve`` at TP=``tp`` answering the guide's two basic examples (same calls as the guide)."""
    from inferneo import InferneoClient
    from inferneo.testing.guide import GUIDE_CONVERSATIONS, GUIDE_MODEL, GUIDE_PROMPTS
    from inferneo.testing.server import RemoteServer
    from inferneo.testing.tiny_models import make_tiny_tokenizer

    tokenizer_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    make_tiny_tokenizer().save_pretrained(tokenizer_dir)
    args = ["--load-format", "dummy", "--dtype", "bfloat16", "--device", s.cfg["device"], "--tokenizer",
            str(tokenizer_dir), "--tensor-parallel-size", str(tp), "--served-model-name",
            GUIDE_MODEL, "--max-model-len", str(s.cfg["engine"]["max_model_len"])]
    if s.cfg["device"] == "cpu":
        args += ["--kv-cache-memory", "64MiB"]
    started = time.perf_counter()
    # The preset's folder (not "preset:NAME") so that a preset registered only in this process serves too.
    server = RemoteServer(arch_presets.materialize_preset(model), *args, startup_timeout=300)
    ready_s = time.perf_counter() - started
    s.log(f"serve TP={tp}: healthy in {ready_s:.1f} s")
    try:
        client = InferneoClient(server.base_url)
        t = time.perf_counter()
        completions = client.completions.create(model=GUIDE_MODEL, prompt=GUIDE_PROMPTS,
                                                max_tokens=100, temperature=0.7)
        completions_s = time.perf_counter() - t
        for i, choice in enumerate(completions.choices):
            s.log(f"  Prompt {i + 1}: {choice.text[:80]!r} ({choice.finish_reason})")
        t = time.perf_counter()
        chats = client.chat.completions.create(model=GUIDE_MODEL, messages=GUIDE_CONVERSATIONS,
                                               max_tokens=150, temperature=0.7)
        chat_s = time.perf_counter() - t
        for i, choice in enumerate(chats.choices):
            s.log(f"  Conversation {i + 1}: {choice.message.content[:80]!r} ({choice.finish_reason})")
        result = {"tp": tp, "ready_s": ready_s, "completion_choices": len(completions.choices),
                  "completion_tokens": completions.usage.completion_tokens, "completions_s": completions_s,
                  "chat_choices": len(chats.choices), "chat_tokens": chats.usage.completion_tokens, "chat_s": chat_s}
        s.log(f"serve: {result['completion_choices']} completion choices ({result['completion_tokens']} tokens, "
              f"{completions_s:.2f} s), {result['chat_choices']} chat choices ({result['chat_tokens']} tokens, "
              f"{chat_s:.2f} s)")
    finally:
        code = server.stop(signal.SIGTERM, timeout=120)
        s.log(f"serve: SIGTERM -> exit status {code}")
        tail = server.log().splitlines()
        s.log("serve log (last lines):\n  " + "\n  ".join(tail[-12:]))
    result["exit_status"] = code
    return result


def summarize(s: Suite, sizes: list[int]) -> None:
    sec = s.results["sections"]
    s.log("\n== summary")
    step = {}
    for tp in sizes:
        for row in sec.get(f"w3_tp{tp}", {}).get("rows", []):  # the faster mode of each batch size
            step[(tp, row["batch"])] = min(row["step_ms"], step.get((tp, row["batch"]), float("inf")))
        for row in sec.get(f"w3_tp{tp}_nccl", {}).get("rows", []):
            s.log(f"  W3 TP={tp} batch {row['batch']} {row['mode']} with NCCL only: {row['step_ms']:.2f} ms")
        w1 = sec.get(f"w1_tp{tp}", {})
        if "output_tok_per_s" in w1:
            s.log(f"  W1 TP={tp}: {w1['output_tok_per_s']:.0f} output tok/s")
    if 1 in sizes:
        for tp in sizes:
            for batch in s.cfg["w3_batches"]:
                if tp != 1 and (1, batch) in step and (tp, batch) in step:
                    ratio = step[(tp, batch)] / step[(1, batch)]
                    s.results.setdefault("ratios", {})[f"w3_b{batch}_tp{tp}_over_tp1"] = ratio
                    target = "  (target < 0.65)" if batch == 1 else ""
                    s.log(f"  W3 batch {batch}: TP={tp} / TP=1 = {ratio:.2f}{target}")
    for name, entry in sec.items():
        s.log(f"  {name:<16} {entry.get('status', '?')[:70]:<72} {entry.get('elapsed_s', '-')} s")


def smoke_preset(num_layers: int) -> str:
    """Register and return the tiny Llama preset ``--smoke`` runs (the 7B's architecture, tiny sizes)."""
    arch_presets.PRESETS["smoke-llama"] = preset_config(
        "llama-2-7b", hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    return "smoke-llama"


def device_names() -> str:
    """"NAME x COUNT" of the visible GPUs, or "cpu"."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}"
    return "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="architecture preset (dummy weights)")
    parser.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma-separated")
    parser.add_argument("--serve", action="store_true", help="also run inferneo serve at the largest size")
    parser.add_argument("--equality", default="eager,graphs",
                        help="modes of the small fp32 TP=1 vs TP=N check (eager, graphs; empty: skip it)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU over gloo, to check the script")
    parser.add_argument("--deadline", type=float, help="seconds the whole run may take (sections skip past it)")
    parser.add_argument("--nccl-w3", action="store_true",
                        help="also time W3 at the largest size with NCCL only (the peer-memory paths off)")
    parser.add_argument("--skip", default="",
                        help="per-size sections to leave out, comma-separated (repeat,single,w3,w1; engine: build "
                             "none)")
    parser.add_argument("--w3-batches", help="W3 batch sizes, comma-separated (default 1,32,128)")
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.w3_batches:
        cfg["w3_batches"] = tuple(int(b) for b in args.w3_batches.split(","))
    if args.deadline:
        cfg["deadline"] = args.deadline
    sizes = [int(x) for x in args.sizes.split(",")]
    model = smoke_preset(num_layers=2) if args.smoke else args.model
    s = Suite(Path(args.out), cfg, name="tp_suite")
    devices = device_names()
    s.log(f"inferneo TP suite: model {model}, sizes {sizes}, torch {torch.__version__}, {devices}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
    s.results.update(model=model, sizes=sizes, devices=devices, torch=torch.__version__)
    dog = Watchdog(s)
    dog.arm("ceilings", 60)
    s.section("ceilings", lambda: setattr(s, "ceilings", measure_ceilings(
        torch.device(cfg["device"]), copy_gib=0.0625 if args.smoke else 2.0, matmul_n=512 if args.smoke else 8192)))
    if s.ceilings is None:
        s.ceilings = Ceilings(3.0e12, 7.0e14)
    s.log(f"GPU 0: copy {s.ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, "
          f"bf16 matmul {s.ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s")
    modes = [m for m in args.equality.split(",") if m] if any(tp > 1 for tp in sizes) else []
    for mode in modes:  # eager first: a stall with graphs only then points at the captured collectives
        dog.arm(f"equality_{mode}", cfg["equality_stall_s"])
        s.section(f"equality_{mode}", lambda eager=mode == "eager": sec_equality(s, sizes, eager), min_left=60)
    for tp in sizes:
        run_size(s, dog, model, tp, frozenset(args.skip.split(",")))
    if args.nccl_w3 and max(sizes) > 1:
        # The same decode steps with every all-reduce through NCCL (spawned workers inherit the variable): the
        # baseline of the peer-memory paths, on the same machine in the same run.
        os.environ["INFERNEO_PEER_ALL_REDUCE"] = "0"
        run_size(s, dog, model, max(sizes), frozenset({"repeat", "w1"}), label="_nccl")
        del os.environ["INFERNEO_PEER_ALL_REDUCE"]
    if args.serve:
        dog.arm("serve")
        s.section("serve", lambda: sec_serve(s, model, max(sizes)), min_left=120)
    dog.deadline = None
    summarize(s, sizes)
    s.log(f"results: {s.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
