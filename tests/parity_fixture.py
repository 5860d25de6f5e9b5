"""The trained parity model (``tests/data/parity-llama``, written by ``benchmarks/gpu/train_parity_fixture.py``):
a 2-layer Llama that continues repeated token patterns with wide greedy margins, so that a token that differs
between two engines is their arithmetic's, not a near-tie's. Shared by the tests and the benchmark scripts."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

PARITY_MODEL = Path(__file__).parent / "data" / "parity-llama"


def copy_parity_model(folder: Path) -> Path:
    """The parity model copied to ``folder`` (which must not exist) with the tiny test tokenizer beside it (the
    model reads ids below 256 only); returns ``folder``."""
    from inferneo.testing.tiny_models import make_tiny_tokenizer

    shutil.copytree(PARITY_MODEL, folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def pattern_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 33-64 tokens for the parity model: each repeats a random pattern of 6-16 distinct tokens
    (ids 3..255) and stops inside a repeat; every other prompt starts with the same 32 tokens (prefix-cache hits)."""
    rng = random.Random(seed)
    shared: list[int] | None = None
    prompts = []
    for i in range(n):
        pattern = rng.sample(range(3, 256), rng.randint(6, 16))
        row = (pattern * 12)[: rng.randint(33, 64)]
        if i % 2:
            shared = shared or row[:32]
            row = shared + row[32:]
        prompts.append(row)
    return prompts
