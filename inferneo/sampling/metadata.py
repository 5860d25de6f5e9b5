"""Per-step sampling tensors, built once from the batch's sampling rows and consumed by the ``Sampler``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from inferneo.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class SamplingRow:
    """What the sampler reads of one sequence: its parameters and its tokens so far.

    The token lists are the core's own (shared, not copied): ``output_token_ids`` grows as the core appends
    tokens, so one row serves a sequence for its whole life.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None


@dataclass(slots=True, frozen=True)
class TokenBitmask:
    """The tokens some rows of a step may sample (structured output): bit ``t % 32`` of ``words[i, t // 32]`` is
    set when token ``t`` is allowed in row ``rows[i]`` of the logits. Rows not listed are unconstrained."""

    rows: list[int]
    words: torch.Tensor  # [len(rows), ceil(V / 32)] int32, on the host


@dataclass(slots=True)
class SamplingMetadata:
    """Everything the sampler needs for one engine step, as tensors on the logits' device.

    Row ``i`` of every ``[B]`` / ``[B, V]`` tensor belongs to ``rows[i]``, i.e. to row ``i`` of the logits.
    A field is ``None`` when no request of the batch uses the feature, so the sampler skips that work entirely:
    an all-greedy batch carries no temperature or top-k/top-p/min-p tensors, and a batch without penalties
    carries no token-count tensors.
    """

    batch_size: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # [B] bool, True on greedy rows; None when the batch is all greedy or all random.
    greedy_mask: torch.Tensor | None
    # [B] float32 (1.0 on greedy rows); None when the batch is all greedy.
    temperature: torch.Tensor | None
    # [B] int64 in [1, V], V meaning "off"; None when no random row sets top_k.
    top_k: torch.Tensor | None
    # The largest top_k among rows that set it (a Python int, so the sampler never syncs to read it).
    max_top_k: int
    # [B] float32, 1.0 meaning "off"; None when no random row sets top_p < 1.
    top_p: torch.Tensor | None
    # [B] float32, 0.0 meaning "off"; None when no random row sets min_p > 0.
    min_p: torch.Tensor | None
    # [B] float32 penalties; each None when every row has the neutral value.
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    # [B, V] bool: token occurs in the prompt. Only built when a row sets repetition_penalty.
    prompt_mask: torch.Tensor | None
    # [B, V] float32: occurrences of each token in the output so far. Only built when a row sets a penalty.
    output_counts: torch.Tensor | None
    # logit_bias of the rows that set it: (row, token) pairs as two [N] int64 tensors and their [N] float32
    # biases, or None.
    bias_rows: torch.Tensor | None
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    # (row, token) pairs banned by min_tokens this step: two [N] int64 tensors, or None.
    min_tokens_rows: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None
    # (row, token) pairs banned by bad_words this step: two [N] int64 tensors, or None.
    bad_words_rows: torch.Tensor | None
    bad_words_ids: torch.Tensor | None
    # allowed_token_ids: the rows that set it ([R] int64) and the tokens each may sample ([R, V] bool), or None.
    allowed_rows: torch.Tensor | None
    allowed_mask: torch.Tensor | None
    # Number of random (non-greedy) rows.
    num_random: int
    # Random rows that carry their own generator: row indices and generators, in the same order.
    seeded_rows: list[int]
    generators: list[torch.Generator]
    # The largest ``logprobs`` asked for in the batch (clamped to V); None when no row asks for logprobs.
    max_num_logprobs: int | None
    # Structured output: the constrained rows ([R] int64) and their allowed-token bitmask ([R, ceil(V/32)] int32);
    # None when no row of the step is constrained.
    bitmask_rows: torch.Tensor | None = None
    bitmask_words: torch.Tensor | None = None

    @property
    def has_penalties(self) -> bool:
        """True when some row has a repetition, frequency or presence penalty."""
        return self.output_counts is not None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device,
              bitmask: TokenBitmask | None = None) -> SamplingMetadata:
        """Build the step's tensors. ``rows[i]`` corresponds to row ``i`` of the logits; ``bitmask`` limits the
        tokens of the rows it lists."""
        device = torch.device(device)
        batch_size = len(rows)
        greedy: list[bool] = []
        temps: list[float] = []
        ks: list[int] = []
        ps: list[float] = []
        mps: list[float] = []
        rep: list[float] = []
        freq: list[float] = []
        pres: list[float] = []
        seeded_rows: list[int] = []
        generators: list[torch.Generator] = []
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        bad_rows: list[int] = []
        bad_ids: list[int] = []
        allowed_rows: list[int] = []
        allowed_ids: list[list[int]] = []
        max_num_logprobs: int | None = None
        for i, row in enumerate(rows):
            p = row.params
            g = p.greedy
            greedy.append(g)
            # Filters on greedy rows would not change their argmax; they stay off there.
            temps.append(1.0 if g else p.temperature)
            ks.append(vocab_size if g or p.top_k == 0 else min(p.top_k, vocab_size))
            ps.append(1.0 if g else p.top_p)
            mps.append(0.0 if g else p.min_p)
            rep.append(p.repetition_penalty)
            freq.append(p.frequency_penalty)
            pres.append(p.presence_penalty)
            if not g and row.generator is not None:
                seeded_rows.append(i)
                generators.append(row.generator)
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if t < vocab_size:  # the engine refuses larger ids up front; never index past the logits
                        bias_rows.append(i)
                        bias_ids.append(t)
                        bias_values.append(float(b))
            for t in min_tokens_banned(row):
                if t < vocab_size:
                    banned_rows.append(i)
                    banned_ids.append(t)
            for t in bad_words_banned(row):
                if t < vocab_size:
                    bad_rows.append(i)
                    bad_ids.append(t)
            if p.allowed_token_ids is not None:
                allowed_rows.append(i)
                allowed_ids.append(p.allowed_token_ids)  # ids past the vocabulary are dropped
            if p.logprobs is not None:
                max_num_logprobs = max(p.logprobs, max_num_logprobs or 0)
        if max_num_logprobs is not None:
            max_num_logprobs = min(max_num_logprobs, vocab_size)

        all_greedy = all(greedy)
        all_random = not any(greedy)
        greedy_mask = temperature = top_k = top_p = min_p = None
        max_top_k = vocab_size
        if not all_greedy:
            if not all_random:
                greedy_mask = _tensor(greedy, torch.bool, device)
            temperature = _tensor(temps, torch.float32, device)
            if any(k < vocab_size for k in ks):
                top_k = _tensor(ks, torch.int64, device)
                max_top_k = max(k for k in ks if k < vocab_size)
            if any(x < 1.0 for x in ps):
                top_p = _tensor(ps, torch.float32, device)
            if any(x > 0.0 for x in mps):
                min_p = _tensor(mps, torch.float32, device)

        any_rep = any(x != 1.0 for x in rep)
        any_freq = any(x != 0.0 for x in freq)
        any_pres = any(x != 0.0 for x in pres)
        prompt_mask = output_counts = None
        if any_rep or any_freq or any_pres:
            # Only rows with a penalty ship their tokens; the others get all-zero rows (penalties are neutral).
            outputs = [r.output_token_ids if rep[i] != 1.0 or freq[i] != 0.0 or pres[i] != 0.0 else []
                       for i, r in enumerate(rows)]
            output_counts = _scatter_rows(outputs, batch_size, vocab_size, device, torch.float32)
            if any_rep:
                prompts = [r.prompt_token_ids if rep[i] != 1.0 else [] for i, r in enumerate(rows)]
                prompt_mask = _scatter_rows(prompts, batch_size, vocab_size, device, torch.bool)

        bias = (None, None, None)
        if bias_ids:
            bias = (_tensor(bias_rows, torch.int64, device), _tensor(bias_ids, torch.int64, device),
                    _tensor(bias_values, torch.float32, device))

        min_tokens_rows = min_tokens_ids = None
        if banned_ids:
            min_tokens_rows = _tensor(banned_rows, torch.int64, device)
            min_tokens_ids = _tensor(banned_ids, torch.int64, device)

        bad_words_rows = bad_words_ids = None
        if bad_ids:
            bad_words_rows = _tensor(bad_rows, torch.int64, device)
            bad_words_ids = _tensor(bad_ids, torch.int64, device)

        allowed_mask = None
        if allowed_rows:
            allowed_mask = _scatter_rows(allowed_ids, len(allowed_rows), vocab_size, device, torch.bool)

        return cls(
            batch_size=batch_size,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=greedy_mask,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=_tensor(rep, torch.float32, device) if any_rep else None,
            frequency_penalty=_tensor(freq, torch.float32, device) if any_freq else None,
            presence_penalty=_tensor(pres, torch.float32, device) if any_pres else None,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            bias_rows=bias[0],
            bias_ids=bias[1],
            bias_values=bias[2],
            min_tokens_rows=min_tokens_rows,
            min_tokens_ids=min_tokens_ids,
            bad_words_rows=bad_words_rows,
            bad_words_ids=bad_words_ids,
            allowed_rows=_tensor(allowed_rows, torch.int64, device) if allowed_rows else None,
            allowed_mask=allowed_mask,
            num_random=batch_size - sum(greedy),
            seeded_rows=seeded_rows,
            generators=generators,
            max_num_logprobs=max_num_logprobs,
            bitmask_rows=_tensor(bitmask.rows, torch.int64, device) if bitmask is not None and bitmask.rows else None,
            bitmask_words=_to_device(bitmask.words, device) if bitmask is not None and bitmask.rows else None,
        )


def min_tokens_banned(row: SamplingRow) -> list[int]:
    """Token ids that may not be sampled yet because the sequence has fewer than ``min_tokens`` outputs.

    As in vLLM, EOS is banned only when it would end the request (``ignore_eos`` is off); stop_token_ids always.
    """
    params = row.params
    if len(row.output_token_ids) >= params.min_tokens:
        return []
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned |= row.eos_token_ids
    return sorted(banned)


def bad_words_banned(row: SamplingRow) -> list[int]:
    """Token ids that would complete one of the request's bad words now: each word's last token, where the output so
    far ends with the tokens before it (a one-token word is banned everywhere). As in vLLM, only the output counts,
    not the prompt."""
    words = row.params.bad_words_token_ids
    if not words:
        return []
    output = row.output_token_ids
    banned = set()
    for word in words:
        prefix = len(word) - 1
        if prefix == 0 or (len(output) >= prefix and output[len(output) - prefix:] == word[:-1]):
            banned.add(word[-1])
    return sorted(banned)


def needs_output_tokens(params: SamplingParams) -> bool:
    """Whether a request's bans depend on the tokens it has generated (a bad word longer than one token)."""
    return any(len(word) > 1 for word in params.bad_words_token_ids or ())


def _tensor(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor (through pinned memory and an async copy on CUDA)."""
    if device.type == "cpu":
        return torch.tensor(data, dtype=dtype)
    return torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` (through pinned memory and an async copy on CUDA)."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def _scatter_rows(token_lists: list[list[int]], batch_size: int, vocab_size: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """A [B, V] tensor holding, per row, the count (float) or presence (bool) of each listed token id.

    Token ids outside ``[0, V)`` are ignored. The lists go to the device flattened, with no padding.
    """
    # One spare column absorbs out-of-range ids, so nothing needs a data-dependent (syncing) filter.
    out = torch.zeros(batch_size, vocab_size + 1, dtype=dtype, device=device)
    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    if total:
        ids = _tensor(list(itertools.chain.from_iterable(token_lists)), torch.int64, device)
        ids = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
        rows = torch.repeat_interleave(torch.arange(batch_size, device=device),
                                       _tensor(lengths, torch.int64, device), output_size=total)
        values = torch.ones(total, dtype=dtype, device=device)
        out.index_put_((rows, ids), values, accumulate=dtype != torch.bool)
    return out[:, :vocab_size]
