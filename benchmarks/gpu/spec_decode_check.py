"""Speculative decoding on the GPU: the trained parity model (``tests/data/parity-llama``, which continues repeated
patterns) with and without ``speculative_config``, checked against Hugging Face's greedy tokens and timed.

1. float32 (TF32 off on both sides): the engine with prompt lookup against HF ``generate`` on the same GPU, 16
   pattern prompts x 40 tokens; prints the share of identical sequences and positions.
2. bfloat16: the same prompts through both engines; the share of tokens before the first difference.
3. Output tokens per second at batch 1 (prompts one after another) and batch 16, both engines in this process,
   rounds alternating: a 2-layer model, so the figure shows what a step with drafts (eager, several positions)
   costs beside a decode step replayed from a CUDA graph, not what a large model gains.

Prints one JSON line per part (appended to ``--out``).

    python benchmarks/gpu/spec_decode_check.py --out spec.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
from offline_throughput import emit_json as emit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from parity_fixture import copy_parity_model, pattern_prompts
    from transformers import AutoModelForCausalLM

    from inferneo import LLM, SamplingParams
    from inferneo.testing.agreement import greedy_agreement

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = copy_parity_model(Path(tempfile.mkdtemp()) / "parity-llama")
    prompts = pattern_prompts(16, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec_config = {"method": "ngram", "num_speculative_tokens": 4}
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
    hf.generation_config.eos_token_id = None
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=args.device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                              pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    del hf

    engines = {}
    for dtype in ("float32", "bfloat16"):
        for name, extra in (("plain", {}), ("spec", {"speculative_config": spec_config})):
            engines[dtype, name] = LLM(str(folder), dtype=dtype, max_model_len=256, device=args.device,
                                       gpu_memory_utilization=0.2, kv_cache_memory="64MiB", **extra)
    got = {key: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
           for key, llm in engines.items()}
    prefix, positional = greedy_agreement(got["float32", "spec"], expected)
    emit({"part": "fp32_vs_hf", "device": device, "identical_sequences": sum(
        g == e for g, e in zip(got["float32", "spec"], expected, strict=True)) / len(prompts),
        "positional": positional, "prefix": prefix,
        "plain_identical_sequences": sum(g == e for g, e in zip(got["float32", "plain"], expected, strict=True))
        / len(prompts), "accepted": engines["float32", "spec"].engine.core.stats.num_accepted_tokens,
        "drafts": engines["float32", "spec"].engine.core.stats.num_draft_tokens}, args.out)
    prefix, positional = greedy_agreement(got["bfloat16", "spec"], got["bfloat16", "plain"])
    emit({"part": "bf16_spec_vs_plain", "device": device, "positional": positional, "prefix": prefix}, args.out)

    for batch in (1, 16):
        seconds = {"plain": 0.0, "spec": 0.0}
        tokens = {"plain": 0, "spec": 0}
        for _ in range(args.rounds):
            for name in ("plain", "spec"):
                llm = engines["bfloat16", name]
                sync()
                start = time.perf_counter()
                if batch == 1:
                    outs = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
                else:
                    outs = llm.generate(prompts, greedy, use_tqdm=False)
                sync()
                seconds[name] += time.perf_counter() - start
                tokens[name] += sum(len(o.outputs[0].token_ids) for o in outs)
        rate = {k: tokens[k] / seconds[k] for k in seconds}
        stats = engines["bfloat16", "spec"].engine.core.stats
        emit({"part": "timing_bf16", "device": device, "batch": batch, "plain_tok_s": round(rate["plain"], 1),
              "spec_tok_s": round(rate["spec"], 1), "speedup": round(rate["spec"] / rate["plain"], 3),
              "acceptance": round(stats.num_accepted_tokens / max(stats.num_draft_tokens, 1), 3),
              "torch": torch.__version__}, args.out)


if __name__ == "__main__":
    main()
