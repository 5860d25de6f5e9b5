"""A small Llama trained to continue repeating patterns, for the bf16 parity check against Hugging Face.

Random weights make a poor bf16 parity model: their greedy picks are full of near-ties, and two correct bf16
implementations that round intermediate values at different points part ways at the first one. This model is
trained (in about a minute on a GPU) on sequences that repeat a random pattern of 6 to 16 tokens; to continue
such a sequence it must find the earlier copy of the current token and read the token after it, which only its
attention layers can do (an induction circuit). Once trained its greedy picks have wide margins, so a parity
failure means a real difference in the computation: attention reading the wrong positions, a wrong rotary
position, a wrong KV slot, and so on.

``build(device)`` trains and returns the HF model; ``prompts(rng, n, length)`` makes prompts of the same kind.
"""

from __future__ import annotations

import time

import numpy as np
import torch

CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PERIODS = (6, 16)  # pattern lengths, inclusive
FIRST_TOKEN = 3  # ids below are special


def repeated_patterns(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    """``n`` rows of ``length`` tokens; each row repeats its own random pattern (distinct tokens)."""
    rows = np.empty((n, length), dtype=np.int64)
    for i in range(n):
        period = int(rng.integers(PERIODS[0], PERIODS[1] + 1))
        pattern = rng.choice(np.arange(FIRST_TOKEN, vocab), size=period, replace=False)
        rows[i] = np.resize(pattern, length)
    return rows


def prompts(rng: np.random.Generator, n: int, length: int, vocab: int = CONFIG["vocab_size"]) -> list[list[int]]:
    """Prompts of ``length`` tokens holding at least one full pattern and the start of its repeat."""
    assert length > PERIODS[1], "a prompt must show a whole pattern and the start of its repeat"
    return repeated_patterns(rng, n, length, vocab).tolist()


def build(device: str, steps: int = 1500, batch: int = 128, seq_len: int = 128, seed: int = 0, lr: float = 1e-3,
          target_loss: float = 0.0, max_seconds: float = float("inf"), log=print, **overrides):
    """Train the model on ``device`` and return it (float32, eval mode) with its last training loss.

    Training stops after ``steps`` steps, or earlier once a logged loss is below ``target_loss`` or
    ``max_seconds`` have passed. ``overrides`` replace values of ``CONFIG`` (smaller models for a quick run on
    CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**dict(CONFIG, **overrides))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    loss_value = float("nan")
    started = time.monotonic()
    for step in range(steps):
        ids = torch.from_numpy(repeated_patterns(rng, batch, seq_len, cfg.vocab_size)).to(device)
        labels = ids.clone()
        labels[:, : PERIODS[1]] = -100  # the first pattern cannot be predicted; learn the repeats only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            loss_value = loss.item()
            log(f"parity model: step {step} loss {loss_value:.4f}")
            if step > 0 and (loss_value < target_loss or time.monotonic() - started > max_seconds):
                break
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, loss_value


@torch.no_grad()
def greedy_margins(model, rows: list[list[int]]) -> np.ndarray:
    """The gap between the best and second-best logit at every position after the first pattern."""
    ids = torch.tensor(rows, device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[:, PERIODS[1]:].float()
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).flatten().cpu().numpy()
