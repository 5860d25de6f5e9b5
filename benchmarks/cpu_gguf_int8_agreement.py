"""How often the default model (the bundled SmolLM2-135M Q4_1 GGUF) picks the same greedy token with the GGUF int8
dot path (``KernelConfig.gguf_int8_dot``, its default row limits) as with the exact float path.

Greedy runs of ``--prompts`` chat prompts for ``--tokens`` tokens each: tokens before each run's first difference
(summed), and, with the exact run's tokens fed to both engines (prompt scoring), the share of positions whose
top-1 token agrees. ``--all-rows`` sends every row count through the int8 path (prefill too). ``--against bf16``
compares the exact path in bfloat16 activations instead of the int8 path, ``--against int16`` the float32
activations held as 16-bit integers (``KernelConfig.gguf_int16``, the default on AVX512_VNNI CPUs; the exact
engine here has it off) — the same measure of what a cheaper arithmetic changes.

    python3 benchmarks/cpu_gguf_int8_agreement.py [--prompts 16] [--tokens 48] [--all-rows] [--against int8|bf16|int16]
"""

from __future__ import annotations

import argparse
import json

from inferneo import LLM, SamplingParams
from inferneo.kernel_config import KernelConfig
from inferneo.quantization import gguf as gguf_module

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "How do I boil an egg?", "What is 12 times 7?",
             "Describe a cat in one sentence.", "Why is the sky blue?", "Name a famous physicist.",
             "Give me a tip for learning Python.", "What does a CPU do?", "Translate 'hello' to Spanish.",
             "What is the largest planet?", "Suggest a name for a dog.", "What is machine learning?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--all-rows", action="store_true")
    parser.add_argument("--against", choices=["int8", "bf16", "int16"], default="int8")
    args = parser.parse_args()
    exact_kernels = KernelConfig(gguf_int8_dot=False, gguf_int16=False)
    exact_llm = LLM(dtype="float32", kernels=exact_kernels, max_model_len=512)
    tok = exact_llm.get_tokenizer()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False)).input_ids for q in (QUESTIONS * 4)[:args.prompts]]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    exact = [o.outputs[0].token_ids for o in exact_llm.generate(prompts, greedy, use_tqdm=False)]
    if args.all_rows:
        gguf_module._INT8_DOT_ROWS = dict.fromkeys((2, 3, 8), ((1, 1 << 30),))
    if args.against == "bf16":
        other_llm = LLM(dtype="bfloat16", kernels=exact_kernels, max_model_len=512)
    elif args.against == "int16":
        other_llm = LLM(dtype="float32", kernels=KernelConfig(gguf_int8_dot=False, gguf_int16=True), max_model_len=512)
    else:
        other_llm = LLM(dtype="float32", kernels=KernelConfig(gguf_int8_dot=True, gguf_int16=False), max_model_len=512)
    other = [o.outputs[0].token_ids for o in other_llm.generate(prompts, greedy, use_tqdm=False)]
    prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x)) for x, y in zip(exact, other, strict=True))
    sequences = [list(p) + list(e) for p, e in zip(prompts, exact, strict=True)]
    score = SamplingParams(max_tokens=0, prompt_logprobs=1)

    def top1(llm: LLM) -> list[int]:
        outs = llm.generate(sequences, score, use_tqdm=False)
        return [next(t for t, lp in pos.items() if lp.rank == 1) for o in outs
                for pos in o.prompt_logprobs[-args.tokens:]]

    a, b = top1(exact_llm), top1(other_llm)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(json.dumps({"against": args.against, "all_rows": args.all_rows, "greedy_tokens": sum(map(len, exact)), "greedy_prefix_agree": prefix,
                      "forced_positions": len(a), "forced_top1_agree": same, "forced_share": round(same / len(a), 4)}))


if __name__ == "__main__":
    main()
