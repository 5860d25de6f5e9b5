"""Batched logits transforms used by the sampler. Each works on a [B, V] float32 tensor with per-row params."""

from __future__ import annotations

from collections.abc import Callable

import torch

_NEG_INF = float("-inf")


def torch_argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (``[B, V]`` → ``[B]`` int64): the sampler's default way to take maxima."""
    return x.argmax(dim=-1)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in rows ``rows`` of ``logits``, every token whose bit is clear in ``words`` (in place).

    ``words`` is ``[R, ceil(V / 32)]`` int32: bit ``t % 32`` of word ``t // 32`` allows token ``t`` (the layout
    xgrammar fills). ``rows`` are distinct and ascending; rows not listed are not touched. Each byte of the words
    is looked up in a table of its eight bits (bytes in little-endian order, as on every device torch runs on),
    one pass over the mask; when every row is listed the logits are filled in place, without a gather.
    """
    vocab = logits.shape[1]
    banned = _banned_bits(words.device)[words.view(torch.uint8).long()].view(words.shape[0], -1)[:, :vocab]
    if rows.numel() == logits.shape[0]:  # all rows, hence 0..B-1 in order
        return logits.masked_fill_(banned, _NEG_INF)
    return logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(banned, _NEG_INF))


def greedy_under_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor,
                         keep_allowed_argmax: bool | None = None,
                         argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The greedy token of every row when rows ``rows`` may only take the tokens allowed in ``words`` (the
    layout of :func:`apply_token_bitmask`); ``logits`` is not modified. Returns ``[B]`` int64.

    Only the constrained rows are copied and masked. On the CPU, a row whose unconstrained argmax is allowed keeps
    it (masking only lowers other tokens, so the first maximum stays the first maximum) and only the others are
    masked: a model that follows its grammar, as real models mostly do, costs a bit test per row. On other devices
    every constrained row is masked (no host sync to pick the rows). ``keep_allowed_argmax`` overrides the choice.
    ``argmax`` (``[B, V]`` → ``[B]``, torch.argmax's choice; None: torch.argmax) takes the maxima.
    """
    argmax = argmax or torch_argmax
    sampled = argmax(logits)
    if keep_allowed_argmax is None:
        keep_allowed_argmax = logits.device.type == "cpu"
    if keep_allowed_argmax:
        picked = sampled.index_select(0, rows)
        word = words.gather(1, (picked // 32).unsqueeze(1)).squeeze(1)
        redo = ((word >> (picked % 32).to(torch.int32)) & 1).eq(0).nonzero().squeeze(1)
        if redo.numel() == 0:
            return sampled
        rows, words = rows.index_select(0, redo), words.index_select(0, redo)
    constrained = logits.index_select(0, rows).float()
    apply_token_bitmask(constrained, torch.arange(rows.numel(), device=rows.device), words)
    return sampled.index_copy_(0, rows, argmax(constrained))


_BANNED_BITS: dict[torch.device, torch.Tensor] = {}


def _banned_bits(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` bool: ``[b, k]`` is True when bit ``k`` of byte ``b`` is clear (the token is not allowed)."""
    table = _BANNED_BITS.get(device)
    if table is None:
        byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        table = ((byte >> torch.arange(8, dtype=torch.int32)) & 1 == 0).to(device)
        _BANNED_BITS[device] = table
    return table


def apply_min_tokens_ban(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, constrained: bool) -> None:
    """Ban token ``ids[i]`` in row ``rows[i]`` (in place: -inf), for sequences short of ``min_tokens``.

    ``constrained`` (rows masked by a structured-output constraint this step): a row whose constraint allows only
    banned tokens (a completed grammar, which can only end) keeps them: the constraint decides where its answer
    ends, before ``min_tokens`` if it must, rather than being broken by an unconstrained token."""
    kept = logits[rows, ids] if constrained else None
    logits[rows, ids] = float("-inf")
    if kept is not None:
        stuck = torch.isneginf(logits[rows]).all(dim=-1)
        logits[rows, ids] = torch.where(stuck, kept, float("-inf"))


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor | None,
                    repetition_penalty: torch.Tensor | None, frequency_penalty: torch.Tensor | None,
                    presence_penalty: torch.Tensor | None) -> torch.Tensor:
    """Apply the three penalties in place and return ``logits``.

    - repetition (HF / CTRL): for each token seen in the prompt or the output, a positive logit is divided by
      the penalty and a negative one multiplied by it;
    - frequency (OpenAI): minus ``penalty * count`` of the token in the output;
    - presence (OpenAI): minus ``penalty`` when the token occurs in the output at all.
    """
    output_mask = output_counts > 0
    if repetition_penalty is not None:
        seen = output_mask if prompt_mask is None else output_mask | prompt_mask
        p = repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits.copy_(torch.where(seen, penalized, logits))
    if frequency_penalty is not None:
        logits.sub_(frequency_penalty.unsqueeze(1) * output_counts)
    if presence_penalty is not None:
        logits.sub_(presence_penalty.unsqueeze(1) * output_mask)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k, then outside its top-p nucleus; in place.

    ``top_k`` is [B] int64 with ``V`` meaning off; ``top_p`` is [B] float32 with 1.0 meaning off. Tokens tied
    with the k-th largest logit are kept. The nucleus is the smallest set of most likely tokens whose mass
    reaches ``p`` (at least one token). One sort serves both filters; with top-k alone a ``topk`` of the
    largest k in the batch replaces the sort.
    """
    vocab_size = logits.shape[-1]
    if top_p is None:
        if top_k is None:
            return logits
        top_vals = logits.topk(max_top_k, dim=-1).values
        threshold = top_vals.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        threshold.masked_fill_((top_k >= vocab_size).unsqueeze(1), _NEG_INF)
        return logits.masked_fill_(logits < threshold, _NEG_INF)

    sorted_logits, order = logits.sort(dim=-1)  # ascending: the most likely token is last
    if top_k is not None:
        threshold = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < threshold, _NEG_INF)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    # A token goes when the mass of the tokens strictly more likely than it already reaches p.
    drop = cum_probs <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability; in place.

    Done in logit space (``logit < max_logit + log(min_p)``), so no softmax is needed; ``min_p = 0`` keeps all.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def draw_seeded_uniforms(generator: torch.Generator, vocab_size: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded row's noise for one :func:`exponential_race`: ``vocab_size`` float32 uniforms (on CPU) from the
    row's own generator. It is the only draw a sampled row makes from its generator, so a request's generator
    that has sampled ``k`` rows is exactly ``k`` of these draws past its seed."""
    return torch.rand(vocab_size, generator=generator, out=out)


def rewind_seeded_generator(generator: torch.Generator, state: torch.Tensor, vocab_size: int,
                            num_rows: int) -> None:
    """Put ``generator`` where sampling ``num_rows`` seeded rows would have left it, starting from ``state``
    (its ``get_state()`` from before).

    Speculative decoding samples a row per draft, but a request keeps only the tokens up to the first rejected
    draft: rewinding to the kept rows makes the ``k``-th output token always use the ``k``-th draw, so a seeded
    request samples what it would without speculation, whatever drafts it (or the batch it ran in) was given.
    """
    generator.set_state(state)
    for _ in range(num_rows):
        draw_seeded_uniforms(generator, vocab_size)


def exponential_race(probs: torch.Tensor, seeded_rows: list[int], generators: list[torch.Generator],
                     draw_unseeded: bool = True,
                     argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sample one token per row: ``argmax(probs / q)`` with ``q ~ Exp(1)`` i.i.d., which picks token ``i``
    with probability ``probs[i]``.

    Rows in ``seeded_rows`` draw their noise (uniforms of shape [V], on CPU) from their own generator only, so
    what they sample never depends on the rest of the batch, nor on the device; the other rows draw from the
    device's global RNG. ``probs`` is overwritten. ``argmax`` as in :func:`greedy_under_bitmask`.
    """
    q = torch.empty_like(probs)
    if draw_unseeded:
        q.exponential_()
    else:
        q.fill_(1.0)
    if seeded_rows:
        # CPU uniforms are several times cheaper to draw than CPU exponentials; -log(u) is taken on the device.
        # u == 0 (probability 2**-24 per token) gives q = inf: that token merely sits out this one draw.
        vocab_size = probs.shape[-1]
        on_cuda = probs.device.type == "cuda"
        u = torch.empty(len(seeded_rows), vocab_size, dtype=torch.float32, pin_memory=on_cuda)
        for i, g in enumerate(generators):
            draw_seeded_uniforms(g, vocab_size, out=u[i])
        rows = torch.tensor(seeded_rows, dtype=torch.int64, pin_memory=on_cuda)
        u = u.to(probs.device, non_blocking=True)
        q[rows.to(probs.device, non_blocking=True)] = u.log_().neg_().to(q.dtype)
    # q == 0 would turn a zero probability into 0/0 = NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (argmax or torch_argmax)(probs.div_(q))
