#!/usr/bin/env python3
"""Follow-up measurements on the H100 after the first suite run (kept for the record; see docs/benchmarks.md).

1. bf16 parity against HF ``generate`` for several spreads of the LM-head row norms (how peaked the random
   model's next-token distributions are), with the number of distinct tokens generated;
2. HF static ``generate`` on W1 (64 prompts, batch 64) with the default dynamic cache and with a static cache,
   prefill alone timed separately, and ``generate_batch`` (default and tuned settings) outside inference mode;
3. a host/device profile of Inferneo's engine steps on Llama-2-7B (graph decode at batch 1 and 32, an eager
   mixed prefill+decode step).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from floors import sync  # noqa: E402
from hf_baselines import build_hf_llama, hf_generate_batch  # noqa: E402

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.model_executor.arch_presets import MARKER_FILE, preset_config  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
RESULTS: dict = {}
rng = np.random.default_rng(0)


def log(*parts):
    print(*parts, flush=True)


def prompts(n, length, vocab):
    return rng.integers(3, vocab - 3, size=(n, length)).tolist()


def greedy(k):
    return SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)


def match_lengths(a, b):
    out = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        out.append(n)
    return out


def parity(sigma: float) -> dict:
    config = dict(preset_config("llama-2-7b"), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
    model = build_hf_llama(config, "cuda", torch.bfloat16, seed=0)
    with torch.no_grad():
        g = torch.Generator(device="cuda").manual_seed(1)
        scale = torch.exp(sigma * torch.randn(config["vocab_size"], 1, generator=g, device="cuda"))
        model.lm_head.weight.mul_(scale.to(model.lm_head.weight.dtype))
    folder = Path(tempfile.mkdtemp()) / f"parity{sigma}"
    model.save_pretrained(folder)
    (folder / MARKER_FILE).write_text(json.dumps({"note": "token-id model for the parity check"}))
    groups = [prompts(16, n, config["vocab_size"]) for n in (16, 24, 32, 48)]
    hf_out = []
    with torch.no_grad():
        for group in groups:
            ids = torch.tensor(group, device="cuda")
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 min_new_tokens=40, do_sample=False, pad_token_id=0)
            hf_out.extend(out[:, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=64,
              kv_cache_memory=2**30)
    flat = [p for group in groups for p in group]
    ours = [o.outputs[0].token_ids for o in llm.generate(flat, greedy(40), use_tqdm=False)]
    del llm
    torch.cuda.empty_cache()
    m = match_lengths(ours, hf_out)
    distinct = len({t for seq in hf_out for t in seq})
    log(f"parity sigma={sigma}: min match {min(m)}, mean {np.mean(m):.1f} of 40, prompts >= 32: "
        f"{sum(x >= 32 for x in m)}/64, distinct HF tokens {distinct}; lengths {m}")
    return {"sigma": sigma, "min": min(m), "mean": float(np.mean(m)), "at_least_32": sum(x >= 32 for x in m),
            "distinct_tokens": distinct, "match_lengths": m}


def hf_w1() -> dict:
    cfg = preset_config("llama-2-7b")
    model = build_hf_llama(cfg, "cuda", torch.bfloat16)
    vocab = cfg["vocab_size"]
    res = {}
    p = prompts(64, 1024, vocab)
    ids = torch.tensor(p, device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(input_ids=ids[:2, :32], attention_mask=mask[:2, :32], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
        for cache in (None, "static"):
            kw = {} if cache is None else {"cache_implementation": cache}
            try:
                sync()
                t = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                               do_sample=False, pad_token_id=0, **kw)
                sync()
                prefill = time.perf_counter() - t
                t = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128,
                                     do_sample=False, pad_token_id=0, **kw)
                sync()
                total = time.perf_counter() - t
                n = (out.shape[1] - 1024) * 64
                res[f"static_generate_{cache or 'dynamic'}"] = {"seconds": total, "prefill_s": prefill,
                                                                "output_tok_per_s": n / total}
                log(f"HF W1 generate batch 64 cache={cache or 'dynamic'}: {total:.1f} s ({n / total:.0f} tok/s), "
                    f"prefill+1 alone {prefill:.2f} s")
            except Exception as exc:
                log(f"HF generate cache={cache}: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
    for label, settings in (("default", {}), ("tuned", {"use_cuda_graph": True, "max_memory_percent": 0.9})):
        try:
            hf_generate_batch(model, prompts(2, 16, vocab), 4, settings)
            t = time.perf_counter()
            produced = hf_generate_batch(model, p, 128, settings)
            sync()
            sec = time.perf_counter() - t
            res[f"generate_batch_{label}"] = {"seconds": sec, "tokens": produced, "output_tok_per_s": produced / sec}
            log(f"HF W1 generate_batch {label} {settings}: {sec:.1f} s, {produced} tokens, {produced / sec:.0f} tok/s")
        except Exception as exc:
            log(f"HF generate_batch {label}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return res


def profile_engine() -> dict:
    from torch.profiler import ProfilerActivity, profile

    llm = LLM("preset:llama-2-7b", load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=2048,
              max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.92)
    eng = llm.engine
    vocab = eng.vocab_size
    res = {}
    for batch in (1, 32):
        for i, pr in enumerate(prompts(batch, 1023, vocab)):
            eng.add_request(f"p{batch}-{i}", pr, greedy(64))
        while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or len(eng.scheduler.waiting):
            eng.step()
        for _ in range(3):
            eng.step()
        sync()
        # host time of one step, by phase (perf_counter around the core's pieces)
        t = time.perf_counter()
        for _ in range(10):
            eng.step()
        sync()
        step_ms = (time.perf_counter() - t) / 10 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.step()
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        log(f"== batch {batch} graph decode: {step_ms:.2f} ms/step\n{table}")
        cuda_table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
        log(cuda_table)
        res[f"decode_b{batch}_ms"] = step_ms
        for i in range(batch):
            eng.abort_request(f"p{batch}-{i}")
    # a mixed step: 32 decoding plus prefill chunks
    for i, pr in enumerate(prompts(32, 1023, vocab)):
        eng.add_request(f"m{i}", pr, greedy(64))
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or len(eng.scheduler.waiting):
        eng.step()
    for i, pr in enumerate(prompts(8, 1024, vocab)):
        eng.add_request(f"n{i}", pr, greedy(4))
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        eng.step()
        sync()
        mixed_ms = (time.perf_counter() - t) * 1e3
    log(f"== mixed step (32 decode + 8192 prefill tokens): {mixed_ms:.1f} ms")
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    res["mixed_ms"] = mixed_ms
    del llm
    torch.cuda.empty_cache()
    return res


def main():
    log(torch.cuda.get_device_name(), torch.__version__)
    for name, fn in (("parity", lambda: [parity(s) for s in (1.0, 2.5, 4.0)]), ("profile", profile_engine),
                     ("hf_w1", hf_w1)):
        t = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as exc:
            RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        log(f"-- {name}: {time.perf_counter() - t:.1f} s")
        (OUT / "probe.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
