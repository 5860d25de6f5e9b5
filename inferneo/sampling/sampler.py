"""The batched sampler: one call picks the next token of every request in an engine step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferneo.sampling.metadata import SamplingMetadata
from inferneo.sampling.ops import (
    apply_min_p,
    apply_min_tokens_ban,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p,
    exponential_race,
    greedy_under_bitmask,
    torch_argmax,
)


@dataclass(slots=True)
class SamplerOutput:
    """The step's sampled tokens and, when some request asked for them, their log-probabilities.

    ``logprob_token_ids`` / ``logprobs`` are ``[B, 1 + max_k]``: column 0 is the sampled token, columns
    ``1..max_k`` the batch-wide top-``max_k`` tokens in descending order (rank ``j`` in column ``j``). A request
    that asked for ``k < max_k`` keeps the first ``1 + k`` columns. All three are ``None`` when no request asked.
    """

    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, 1 + max_k] int64
    logprobs: torch.Tensor | None  # [B, 1 + max_k] float32
    sampled_token_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


class Sampler:
    """Sample the next token for every row of a ``[B, V]`` logits tensor, on the logits' device.

    Pipeline, per row: structured output's bitmask (disallowed tokens to -inf) → tokens outside
    ``allowed_token_ids`` to -inf → logit_bias added → min_tokens mask (EOS / stop ids to -inf) → tokens that would
    complete a bad word to -inf → repetition, frequency, presence penalties →
    [log-probabilities taken here] → greedy rows: argmax; random rows: ÷ temperature → top-k → top-p → min-p →
    softmax → exponential race (seeded rows draw from their own generator).

    Log-probabilities are the log-softmax of the logits after logit_bias, the token bans and penalties but
    before temperature and the top-k / top-p / min-p filters, so they describe the model's (biased, penalized)
    distribution whatever the sampling settings. The caller's logits tensor is never modified.

    ``argmax`` picks each row's token wherever the pipeline takes a maximum (greedy rows, the exponential race):
    ``[B, V]`` float32 → ``[B]`` int64 with ``torch.argmax``'s choice (lowest index among ties, NaN first); None
    is ``torch.argmax``. The CPU engine passes its native kernel (:func:`inferneo.kernels.cpu.argmax_rows_for`).
    """

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._argmax = argmax or torch_argmax

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row; ``metadata`` must have been built for exactly these rows."""
        md = metadata
        assert logits.dim() == 2 and tuple(logits.shape) == (md.batch_size, md.vocab_size), (
            f"logits {tuple(logits.shape)} do not match metadata ({md.batch_size}, {md.vocab_size})")
        bans = md.allowed_rows is not None or md.bad_words_rows is not None
        edits = (md.bias_rows is not None or md.min_tokens_rows is not None or md.has_penalties
                 or md.bitmask_rows is not None or bans)
        if md.all_greedy and not edits and md.max_num_logprobs is None:
            return SamplerOutput(self._argmax(logits), None, None, None)  # no float32 copy needed
        if (md.all_greedy and md.max_num_logprobs is None and md.bitmask_rows is not None
                and md.bias_rows is None and md.min_tokens_rows is None and not md.has_penalties and not bans):
            return SamplerOutput(greedy_under_bitmask(logits, md.bitmask_rows, md.bitmask_words, argmax=self._argmax),
                                 None, None, None)
        x = logits.float()
        owned = x is not logits  # a dtype conversion already made a private copy

        if edits:
            if not owned:
                x, owned = x.clone(), True
            if md.bitmask_rows is not None:
                apply_token_bitmask(x, md.bitmask_rows, md.bitmask_words)
            if md.allowed_rows is not None:
                x[md.allowed_rows] = x[md.allowed_rows].masked_fill_(~md.allowed_mask, float("-inf"))
            if md.bias_rows is not None:
                x.index_put_((md.bias_rows, md.bias_ids), md.bias_values, accumulate=True)
            if md.min_tokens_rows is not None:
                apply_min_tokens_ban(x, md.min_tokens_rows, md.min_tokens_ids, md.bitmask_rows is not None)
            if md.bad_words_rows is not None:
                x[md.bad_words_rows, md.bad_words_ids] = float("-inf")
            if md.has_penalties:
                apply_penalties(x, md.output_counts, md.prompt_mask, md.repetition_penalty,
                                md.frequency_penalty, md.presence_penalty)

        all_logprobs = torch.log_softmax(x, dim=-1) if md.max_num_logprobs is not None else None

        if md.all_greedy:
            sampled = self._argmax(x)
        else:
            greedy_ids = None if md.all_random else self._argmax(x)
            temperature = md.temperature.unsqueeze(1)
            x = x.div_(temperature) if owned else x / temperature
            apply_top_k_top_p(x, md.top_k, md.max_top_k, md.top_p)
            if md.min_p is not None:
                apply_min_p(x, md.min_p)
            probs = x.softmax(dim=-1)
            sampled = exponential_race(probs, md.seeded_rows, md.generators,
                                       draw_unseeded=len(md.seeded_rows) < md.num_random, argmax=self._argmax)
            if greedy_ids is not None:
                sampled = torch.where(md.greedy_mask, greedy_ids, sampled)

        if all_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        token_ids, token_logprobs, ranks = _gather_logprobs(all_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled, token_ids, token_logprobs, ranks)


def _gather_logprobs(all_logprobs: torch.Tensor, sampled: torch.Tensor,
                     num_logprobs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled token + top-``num_logprobs`` ids and log-probabilities, and the sampled token's rank.

    The rank is 1 + the number of tokens strictly more likely, so an argmax pick always has rank 1.
    """
    sampled = sampled.unsqueeze(1)
    sampled_logprobs = all_logprobs.gather(1, sampled)
    ranks = (all_logprobs > sampled_logprobs).sum(dim=-1).add_(1)
    if num_logprobs == 0:
        return sampled, sampled_logprobs, ranks
    top_logprobs, top_ids = all_logprobs.topk(num_logprobs, dim=-1)
    return (torch.cat([sampled, top_ids], dim=1), torch.cat([sampled_logprobs, top_logprobs], dim=1), ranks)
