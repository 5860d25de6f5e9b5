"""LoRA adapters for tests, examples and benchmarks, in PEFT's folder layout.

:func:`make_peft_adapter` builds one with PEFT itself (``get_peft_model`` over the Hugging Face model of a
checkpoint folder, ``lora_B`` drawn non-zero, ``save_pretrained``): the reference format. :func:`write_lora_adapter`
writes the same layout from the model's shapes alone, without PEFT or the base weights, for benchmarks of
architectures built from their config (a 7B model need not be loaded to give it adapters).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from inferneo.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, lora_targets


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, *, r: int, target_modules: str | Sequence[str],
                      lora_alpha: float = 16, use_rslora: bool = False, seed: int = 0, std: float = 0.1,
                      **options) -> Path:
    """A PEFT LoRA adapter of the float32 HF model in ``base_dir`` with random non-zero A and B; returns its
    folder. ``target_modules`` is PEFT's: module names, or one string (``"all-linear"``, a regular expression);
    ``options`` are further ``LoraConfig`` fields (``rank_pattern``, ``layers_to_transform``, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, use_rslora=use_rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **options)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def write_lora_adapter(hf_config: dict, out_dir: str | Path, *, r: int, target_modules: Sequence[str],
                       lora_alpha: float = 32, seed: int = 0, std: float = 0.02,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """A PEFT-layout LoRA adapter with random weights for the model of ``hf_config`` (a config.json dict), written
    without PEFT; returns its folder."""
    from safetensors.torch import save_file

    from inferneo.model_executor.models.registry import get_model_class

    config = get_model_class(hf_config).config_from_hf(hf_config)
    targets = lora_targets(config)
    shapes = {name: (t.in_features, width, t.module.split(".")[0])
              for t in targets.values() for name, width in t.shards}
    unknown = set(target_modules) - set(shapes)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; known: {sorted(shapes)}")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for name in target_modules:
            in_features, out_features, block = shapes[name]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, in_features, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, r, generator=gen) * std).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
                      "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
                      "use_rslora": False, "base_model_name_or_path": hf_config.get("_name_or_path", "")}
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
    return out
