"""Benchmark workloads: random token-id prompts (the same ones ``benchmarks/offline_throughput.py`` builds, so
figures from either can be compared by ``workload_sha256``) or prompts read from a JSON-lines file.

Random prompts draw ids from ``[100, vocab_size - 100)`` (special tokens live at the ends of most vocabularies)
with numpy's ``default_rng(seed)``; prompt and output lengths are uniform in their ranges, both ends included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TOKEN_MARGIN = 100


@dataclass(slots=True)
class Workload:
    """Prompts (text or token ids) and the number of tokens to generate for each."""

    prompts: list[str | list[int]]
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self) -> str:
        """A short hash of the exact requests, equal for equal workloads."""
        return workload_digest(self.prompts, self.output_lens)


def parse_range(text: str) -> tuple[int, int]:
    """``"16:128"`` -> (16, 128), both ends included; ``"64"`` -> (64, 64)."""
    lo, _, hi = str(text).partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: want N or LO:HI") from None
    if lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want LO:HI with 1 <= LO <= HI")
    return lo_i, hi_i


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                  vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """Random token-id prompts and output lengths; the same arguments always give the same workload."""
    import numpy as np  # here, so that the CLI (and a client-only install) does not need numpy to start

    if vocab_size <= 2 * TOKEN_MARGIN:
        raise ValueError(f"vocab_size {vocab_size} is too small (random prompts need more than "
                         f"{2 * TOKEN_MARGIN} ids)")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    output_lens = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    prompts = [rng.integers(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN, size=int(n)).tolist() for n in prompt_lens]
    return prompts, [int(n) for n in output_lens]


def random_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                    vocab_size: int) -> Workload:
    """:func:`make_workload` as a :class:`Workload`."""
    prompts, output_lens = make_workload(num_requests, prompt_len, output_len, seed, vocab_size)
    return Workload(list(prompts), output_lens)


def workload_digest(prompts: list, output_lens: list[int]) -> str:
    """A short hash of the exact workload, to check that two results ran the same requests."""
    return hashlib.sha256(json.dumps([prompts, output_lens]).encode()).hexdigest()[:16]


def load_dataset(path: str | Path, num_requests: int | None = None, default_output_len: int = 128) -> Workload:
    """Prompts from a JSON-lines file: each line ``{"prompt": text or token ids, "output_len": N}``
    (``max_tokens`` is read as a synonym; without either, ``default_output_len``). With ``num_requests`` the
    file is cycled or cut to that many."""
    prompts: list[str | list[int]] = []
    output_lens: list[int] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number} is not valid JSON: {exc}") from None
            prompt = item.get("prompt") if isinstance(item, dict) else None
            if not (isinstance(prompt, str) and prompt) and not (
                    isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
                raise ValueError(f"{path} line {number} needs a 'prompt': a non-empty string or list of token ids")
            n = item.get("output_len", item.get("max_tokens", default_output_len))
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{path} line {number}: output_len must be a positive integer, got {n!r}")
            prompts.append(prompt)
            output_lens.append(n)
            if num_requests is not None and len(prompts) >= num_requests:
                break
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    if num_requests is not None:
        base = len(prompts)
        for i in range(base, num_requests):
            prompts.append(prompts[i % base])
            output_lens.append(output_lens[i % base])
    return Workload(prompts, output_lens)
