#!/usr/bin/env python3
"""Issue 22's paths on the GPU, against Hugging Face on the same device and weights (float32).

A tiny random Llama (float32) is built; then, on ``--device`` (``cuda`` by default):

1. prompt log-probabilities (``SamplingParams(prompt_logprobs=5)``, chunked prefill with a small token budget)
   against ``log_softmax`` of HF's logits: the largest absolute difference over every prompt token;
2. embeddings (``LLM.embed``: last-token pooling, normalised) against HF's normalised last hidden state: the
   smallest cosine;
3. LoRA: three PEFT adapters (ranks 4, 8, 16; different target modules) mixed in one batch with base-model
   requests, with two device slots (LRU), through the engine's Triton LoRA kernels (captured in CUDA graphs):
   greedy tokens against HF + PEFT (unmerged), as the share of tokens that agree.

Prints one JSON object and writes ``issue22_check.json`` to ``--out``; exits 1 when a check fails. ``--device cpu``
runs the same checks on CPU (what the CI tests assert, in one script); ``--lora-only`` runs the third alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

from inferneo import LLM, LoRARequest, SamplingParams  # noqa: E402
from inferneo.testing import make_tiny_checkpoint  # noqa: E402
from inferneo.testing.lora_adapters import make_peft_adapter  # noqa: E402

ADAPTERS = (  # rank, target modules
    (4, ("q_proj", "v_proj")),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (16, ("up_proj", "down_proj", "o_proj")),
)
MAX_NEW = 12


def prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(6, 60, (count,), generator=gen)]


@torch.no_grad()
def hf_reference(model, ids: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax`` of the logits at every prompt position and the normalised last hidden state."""
    out = model(torch.tensor([ids], device=device), output_hidden_states=True)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    last = out.hidden_states[-1][0, -1].float()
    return logprobs.cpu(), torch.nn.functional.normalize(last, dim=0).cpu()


@torch.no_grad()
def hf_greedy(model, ids: list[int], device: str) -> list[int]:
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=MAX_NEW, do_sample=False,
                         min_new_tokens=MAX_NEW, pad_token_id=0)
    return out[0, len(ids):].tolist()


def agreement(got: list[list[int]], expected: list[list[int]]) -> float:
    """The share of tokens that agree, each sequence counted up to its first difference (after it the two
    continuations diverge)."""
    same = total = 0
    for x, y in zip(got, expected, strict=True):
        common = 0
        while common < min(len(x), len(y)) and x[common] == y[common]:
            common += 1
        same += common
        total += max(len(x), len(y))
    return same / max(total, 1)


def check_prompt_logprobs_and_embeddings(llm, batch: list[list[int]], refs, results: dict) -> None:
    """Checks 1 and 2 (see the module doc) into ``results``."""
    # 1. prompt log-probabilities
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)
    worst = 0.0
    for ids, out, (logprobs, _) in zip(batch, outs, refs, strict=True):
        entries = out.prompt_logprobs
        assert entries[0] is None and len(entries) == len(ids)
        for pos in range(1, len(ids)):
            got = entries[pos][ids[pos]].logprob
            worst = max(worst, abs(got - logprobs[pos - 1, ids[pos]].item()))
    results["prompt_logprobs_max_abs_diff"] = worst
    # 2. embeddings
    embedded = llm.embed(batch, use_tqdm=False)
    cosines = [float(torch.dot(torch.tensor(e.outputs.embedding), ref)) for e, (_, ref) in zip(embedded, refs,
                                                                                                  strict=True)]
    results["embedding_min_cosine"] = min(cosines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    parser.add_argument("--lora-only", action="store_true", help="only the LoRA check (3)")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = args.device
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_checkpoint(Path(tmp) / "base", "llama", vocab_size=512, hidden_size=128, num_layers=3)
        adapters = [make_peft_adapter(base, Path(tmp) / f"lora{i}", r=r, target_modules=mods, seed=i + 1)
                    for i, (r, mods) in enumerate(ADAPTERS)]
        batch = prompts(512, 12)
        hf = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32).to(device).eval()
        llm = LLM(str(base), dtype="float32", device=device, enable_lora=True, max_loras=2, max_lora_rank=16,
                  max_num_batched_tokens=64, kv_cache_memory="256MiB")
        if not args.lora_only:
            refs = [hf_reference(hf, ids, device) for ids in batch]
            check_prompt_logprobs_and_embeddings(llm, batch, refs, results)
        # 3. LoRA, mixed with base requests, more adapters than slots
        requests = [None if i % 4 == 3 else LoRARequest(f"a{i % 4}", i % 4 + 1, str(adapters[i % 4]))
                    for i in range(len(batch))]
        greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(batch, greedy, lora_request=requests, use_tqdm=False)]
        expected = []
        peft_models = {}
        for ids, req in zip(batch, requests, strict=True):
            if req is None:
                expected.append(hf_greedy(hf, ids, device))
                continue
            if req.lora_int_id not in peft_models:
                fresh = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
                peft_models[req.lora_int_id] = PeftModel.from_pretrained(fresh, req.lora_path).to(device).eval()
            expected.append(hf_greedy(peft_models[req.lora_int_id], ids, device))
        base_only = [hf_greedy(hf, ids, device) for ids in batch]
        results["lora_greedy_agreement"] = agreement(got, expected)
        results["lora_changes_outputs"] = sum(g != b for g, b, r in zip(got, base_only, requests, strict=True)
                                              if r is not None)
        llm.shutdown()
    checks = {
        "lora": results["lora_greedy_agreement"] >= (1.0 if device == "cpu" else 0.95)
        and results["lora_changes_outputs"] > 0,
    }
    if not args.lora_only:
        checks["prompt_logprobs"] = results["prompt_logprobs_max_abs_diff"] < (1e-4 if device == "cpu" else 2e-3)
        checks["embeddings"] = results["embedding_min_cosine"] > 1 - 1e-5
    results["checks"] = checks
    text = json.dumps(results, indent=1)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "issue22_check.json").write_text(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
