"""Hugging Face transformers on the same workloads: static ``generate`` and continuous-batching ``generate_batch``."""

from __future__ import annotations

import contextlib
import inspect

import torch


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_hf_llama(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``LlamaForCausalLM`` with random weights from config values, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "model_type")}
    cfg = LlamaConfig(**values)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def build_hf_model(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """The transformers model of ``config["model_type"]`` with random weights from config values, built directly on
    ``device`` (its default attention and experts implementations)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "model_type")}
    cfg = AutoConfig.for_model(config["model_type"], **values)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy static-batch ``generate``, ``batch_size`` prompts at a time; prompts of one batch must have equal
    length (no padding). Every prompt gets exactly ``max_new_tokens`` tokens."""
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids = torch.tensor(chunk, dtype=torch.long, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outputs.extend(out[:, ids.shape[1]:].tolist())
    return outputs


def hf_generate_batch(model, prompts: list[list[int]], max_new_tokens: int, settings: dict) -> int:
    """Continuous batching with ``generate_batch``; returns the number of tokens generated.

    ``settings`` are ``ContinuousBatchingConfig`` fields; the ones this transformers version lacks are dropped.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    kwargs: dict = {"generation_config": gen}
    params = inspect.signature(model.generate_batch).parameters
    if settings and "continuous_batching_config" in params:
        from transformers.generation import ContinuousBatchingConfig

        fields = inspect.signature(ContinuousBatchingConfig.__init__).parameters
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            **{k: v for k, v in settings.items() if k in fields})
    if "progress_bar" in params:
        kwargs["progress_bar"] = False
    # Not under inference_mode: generate_batch runs its loop in a worker thread, which then may not update the
    # inference tensors the caller's mode would create (transformers 5.17 fails with "Inplace update to inference
    # tensor outside InferenceMode").
    with torch.no_grad():
        results = model.generate_batch(inputs=prompts, **kwargs)
    return sum(len(r.generated_tokens) for r in results.values())
