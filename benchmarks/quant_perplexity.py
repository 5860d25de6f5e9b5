#!/usr/bin/env python3
"""Perplexity of a model under each weight / KV-cache format, through the engine's own model and KV cache.

The engine samples only the last position of each request, so this script drives the model the runner built
(quantized layers, device kernels, the KV cache in the asked dtype) directly: each text runs as chunked prefills
of ``--chunk`` tokens, so every chunk after the first reads the keys and values the earlier ones stored in the
cache (an FP8 KV cache is read back de-quantized, as in serving). Perplexity is ``exp`` of the mean negative
log-likelihood of every token after the first.

    python benchmarks/quant_perplexity.py                        # the default model, CPU, every variant
    python benchmarks/quant_perplexity.py --model DIR --variants bf16,fp8-kv

Variants: ``fp32``, ``bf16``, ``fp8-kv`` (bf16 weights, FP8 KV cache), ``fp8`` (online FP8 weights),
``MODEL=DIR`` (any other checkpoint folder of the same model, e.g. an AWQ copy: its format comes from its
config). Text: the repository's docs (written after every model we test was trained: held out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offline_throughput import emit_json  # noqa: E402

from inferneo import LLM  # noqa: E402
from inferneo.attention import AttentionMetadata, PrefillSpan  # noqa: E402

VARIANTS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "fp8-kv": dict(dtype="bfloat16", kv_cache_dtype="fp8"),
    "fp8": dict(dtype="bfloat16", quantization="fp8"),
}


def held_out_texts(tokenizer, max_texts: int, tokens_per_text: int) -> list[list[int]]:
    """Token ids of paragraphs of the repository's docs, ``tokens_per_text`` each."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer.encode(text)
    return [ids[i : i + tokens_per_text] for i in range(0, len(ids) - tokens_per_text, tokens_per_text)][:max_texts]


@torch.inference_mode()
def token_nlls(llm: LLM, ids: list[int], chunk: int) -> torch.Tensor:
    """Negative log-likelihood of ``ids[1:]`` given the tokens before each, chunked prefill over the paged
    cache (blocks 0.. of the idle engine)."""
    runner = llm.engine.runner
    model, backend, device = runner.model, runner.backend, runner.device
    block = runner.block_size
    blocks = math.ceil(len(ids) / block)
    assert blocks <= runner.num_blocks, "text longer than the KV cache"
    table = torch.arange(blocks, device=device)
    nlls = []
    for start in range(0, len(ids) - 1, chunk):
        count = min(chunk, len(ids) - start)
        positions = torch.arange(start, start + count, device=device)
        slots = table[positions // block] * block + positions % block
        meta = AttentionMetadata(block_size=block, num_decode_tokens=0, slot_mapping=slots,
                                 decode_block_tables=None, decode_seq_lens=None,
                                 prefills=[PrefillSpan(0, count, start, table)])
        backend.prepare(meta)
        hidden = model(torch.tensor(ids[start : start + count], device=device), positions, runner.kv_caches, meta)
        logprobs = torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)
        targets = torch.tensor(ids[start + 1 : start + count + 1], device=device)
        nlls.append(-logprobs[: len(targets)].gather(1, targets[:, None]).squeeze(1))
    return torch.cat(nlls).cpu()


def perplexity(model: str | None, texts: list[list[int]], chunk: int, **engine_kw) -> dict:
    """Perplexity over ``texts`` with one engine built from ``engine_kw``."""
    start = time.perf_counter()
    llm = LLM(model, **engine_kw)
    try:
        nll = torch.cat([token_nlls(llm, ids, chunk) for ids in texts])
        kv_blocks = llm.engine.kv_cache.num_blocks
    finally:
        llm.shutdown()
    return {"perplexity": math.exp(nll.mean().item()), "tokens": nll.numel(), "kv_blocks": kv_blocks,
            "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled model)")
    parser.add_argument("--variants", default="fp32,bf16,fp8-kv,fp8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per text")
    parser.add_argument("--chunk", type=int, default=64, help="prefill chunk (later chunks read the KV cache)")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--out", default=None, help="append one JSON line per variant here")
    parser.add_argument("--pattern-texts", action="store_true",
                        help="held-out repeated-pattern sequences (the trained parity model's task) instead of docs")
    args = parser.parse_args()

    if args.pattern_texts:
        sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
        import numpy as np
        from parity_model import prompts as pattern_prompts

        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        texts = pattern_prompts(np.random.default_rng(12345), args.texts, args.tokens, vocab)
    else:
        probe = LLM(args.model, device=args.device, kv_cache_memory="16MiB")
        texts = held_out_texts(probe.get_tokenizer(), args.texts, args.tokens)
        probe.shutdown()
    for variant in args.variants.split(","):
        model, kw = args.model, {}
        if "=" in variant:
            variant, model = variant.split("=", 1)
        else:
            kw = dict(VARIANTS[variant])
        try:
            row = perplexity(model, texts, args.chunk, device=args.device, kv_cache_memory=args.kv_cache_memory,
                             enable_prefix_caching=False, **kw)
        except ValueError as exc:
            row = {"error": str(exc)}
        row = {"variant": variant, "model": model or "default", "device": args.device, **kw, **row}
        emit_json(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
