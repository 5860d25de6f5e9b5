"""A small Qwen3-MoE on the CPU: Inferneo against Hugging Face transformers on the same random weights.

``python benchmarks/cpu_moe_vs_hf.py`` writes a Qwen3-MoE checkpoint of about 90M parameters (hidden 512, 6 layers,
32 experts of width 256, top-4, float32) with ``make_tiny_checkpoint``, then generates greedily from the same token-id
prompts with both (each warmed up once) and prints one JSON line: output tok/s of each, whether the token ids agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "qwen3_moe", "qwen3_moe", vocab_size=4096, hidden_size=512,
                                    num_layers=6, num_heads=8, num_kv_heads=4, num_experts=32, top_k=4)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(10, 4000, (args.prompts, args.prompt_len), generator=g).tolist()
        n = args.new_tokens

        llm = LLM(str(path), dtype="float32", max_model_len=512, kv_cache_memory="256MiB", num_threads=args.threads)
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        ours_s = time.perf_counter() - start
        llm.shutdown()

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor(prompts)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up
            start = time.perf_counter()
            theirs = model.generate(ids, **kwargs)[:, ids.shape[1]:].tolist()
            hf_s = time.perf_counter() - start
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
    produced = args.prompts * n
    print(json.dumps({"model": f"qwen3_moe {params_m:.0f}M params, float32", "threads": args.threads,
                      "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": n,
                      "inferneo_tok_per_s": round(produced / ours_s, 1), "hf_tok_per_s": round(produced / hf_s, 1),
                      "same_token_ids": ours == theirs}))


if __name__ == "__main__":
    main()
