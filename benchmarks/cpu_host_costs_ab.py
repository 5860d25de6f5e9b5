"""The CPU engine's host-side shortcuts against the paths they replace, alternated in one process.

Switched together at run time on one engine (the offline default workload of ``offline_throughput.py`` by
default, each run with prompts shifted so that no run hits the prefix cache of an earlier one):

- ``new``: as shipped: ``NativeDecoderLayer`` (the layer calls its kernels directly), the sampler's native argmax,
  the tied Q8_0 embedding's native lookup, for q/k-norm models (``--arch qwen3``, ``gemma3``) the norms and rotary
  embedding as one native kernel (``QKNormRotaryAttention``), and Gemma's norms native (``NativeGemmaRMSNorm``);
- ``old``: the plain ``DecoderLayer`` forward, ``torch.argmax``, the lookup through PyTorch ops, the q/k norms and
  rotary embedding and Gemma's norms as the modules' PyTorch code.

Alternating in one process removes the drift between processes and minutes that a small shared machine shows
(20-40% on the project's 2-vCPU hosts), so the ratio of the two means is the figure to read::

    python3 benchmarks/cpu_host_costs_ab.py --dtype bfloat16 --runs 8
    python3 benchmarks/cpu_host_costs_ab.py --dtype float32 --batch 8 --output-len 60   # 8 requests of 64 tokens
    python3 benchmarks/cpu_host_costs_ab.py --arch qwen3 --batch 8   # random Qwen3 weights of the default's shape

The default model runs unless ``--arch`` names an architecture of ``inferneo.testing``'s tiny checkpoints, built
here with random weights at the default model's shape (hidden 576, 30 layers, 9 query and 3 key/value heads,
vocabulary 49,152; Qwen3's configuration gives it 128-wide heads).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inferneo import LLM, SamplingParams
from inferneo.model_executor.layers.basic import GemmaRMSNorm
from inferneo.model_executor.models.llama import Attention, DecoderLayer
from inferneo.sampling.ops import torch_argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=8, help="timed runs, new and old alternated")
    parser.add_argument("--batch", type=int, default=0,
                        help="requests of 64 prompt tokens (0: the offline suite's 64 requests of 16-128 / 16-128)")
    parser.add_argument("--output-len", type=int, default=60, help="output tokens a request with --batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="", help="random weights of this architecture instead of the default model")
    args = parser.parse_args()

    model_path = None
    if args.arch:
        from inferneo.testing.tiny_models import make_tiny_checkpoint

        model_path = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / args.arch, args.arch, vocab_size=49152,
                                              hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                              tie_word_embeddings=True, torch_dtype=torch.bfloat16))
    llm = LLM(model_path, dtype=args.dtype, max_model_len=256, num_threads=args.threads, seed=0)
    runner = llm.engine.runner
    model, sampler = runner.model, runner.sampler
    native_argmax = sampler._argmax
    embedding = model.embed_tokens
    native_rows = getattr(embedding, "native_rows", None)
    # each module the CPU kernels swapped in, with the class it replaced
    plain = {"NativeDecoderLayer": DecoderLayer, "QKNormRotaryAttention": Attention,
             "NativeGemmaRMSNorm": GemmaRMSNorm}
    swapped = [(m, type(m), plain[type(m).__name__]) for m in model.modules() if type(m).__name__ in plain]
    print(f"native argmax: {native_argmax is not torch_argmax}, native lookup: {native_rows is not None}, "
          f"switched modules: {dict(collections.Counter(cls.__name__ for _, cls, _ in swapped))}")

    def use(new: bool) -> None:
        sampler._argmax = native_argmax if new else torch_argmax
        for module, native_class, plain_class in swapped:
            module.__class__ = native_class if new else plain_class
        if native_rows is not None:
            embedding.native_rows = native_rows if new else None

    rng = np.random.default_rng(0)
    if args.batch:
        prompt_lens, output_lens = [64] * args.batch, [args.output_len] * args.batch
    else:
        prompt_lens, output_lens = rng.integers(16, 129, 64), rng.integers(16, 129, 64)
    prompts = [rng.integers(100, 49052, int(n)).tolist() for n in prompt_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=int(n), min_tokens=int(n), ignore_eos=True)
              for n in output_lens]
    llm.generate(["Hello", "Hi there"], params[:2], use_tqdm=False)
    results: dict[str, list[float]] = {"new": [], "old": []}
    for run in range(args.runs):
        which = "new" if run % 2 == 0 else "old"
        use(which == "new")
        prompts = [[(t + 7919 * (run + 1)) % 48900 + 100 for t in p] for p in prompts]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        results[which].append(round(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, 1))
    use(True)
    means = {k: round(sum(v) / len(v), 1) for k, v in results.items()}
    print(json.dumps({"dtype": args.dtype, "out_tok_per_s": results, "mean": means,
                      "new_over_old": round(means["new"] / means["old"], 3)}))


if __name__ == "__main__":
    main()
