"""Packing one engine step's inputs into a single int64 host buffer, so they reach the device in one copy.

The buffer holds, in this order: token ids, positions and KV slots (one per token), decode sequence lengths
(one per decode row), the rows of the hidden states to sample, the decode block tables (``rows x width``) and
the block tables of the multi-token spans. A :class:`Layout` fixes where each section starts. In eager mode the
layout is sized to the step; for CUDA graphs it is sized to the largest bucket and never changes, so the graph's
static input tensor is simply the device copy of this buffer.

Decode rows are filled with vectorized numpy over all decoding requests; only multi-token spans (a few per
step) are handled one by one. Rows added to pad a decode batch to its bucket hold token 0 at position 0, write
their key and value into the spare KV block and attend to that one slot (sequence length 1), so an attention
backend needs no notion of padding.

A request verifying draft tokens (speculative decoding) runs as decode rows too, one per token: row ``j`` of it
sits at position ``p + j``, attends to the first ``p + j + 1`` tokens of the request's block table, and so sees
the keys the rows before it store in the same step. Such a step is decode-only, so it replays the CUDA graph of
its row count like any decode step. Every backend stores a step's keys and values before any row attends
(``AttentionMetadata.decode_rows_share_requests`` tells a backend that fuses the two per row).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from inferneo.attention import AttentionMetadata, PrefillSpan
from inferneo.engine.prompt_embeds import PromptEmbeds
from inferneo.engine.protocol import LoraRef
from inferneo.model_executor.layers.rotary import LongRopeSwitch
from inferneo.multimodal.inputs import ImageInput
from inferneo.pooling.pooler import PoolingRow
from inferneo.sampling.metadata import SamplingRow, TokenBitmask
from inferneo.worker.prompt_logprobs import PromptLogprobSpan


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence of a step, as the worker sees it: plain values and the core's token and block lists (shared,
    read only here)."""

    token_ids: list[int]  # the prompt and the tokens generated so far that are on the host
    num_computed_tokens: int  # tokens whose keys and values are in the KV cache already
    num_new_tokens: int  # tokens to run this step
    block_ids: list[int]  # the sequence's KV blocks
    # With asynchronous scheduling: the row, among the samples of the step still in flight, of this sequence's
    # input token (not on the host yet); -1 when there is none.
    pending_sample: int
    samples: bool  # whether this step samples the sequence's next token
    sampling: SamplingRow
    # An embedding request: how its hidden states are pooled ("mean", "cls", "last"); None for generation.
    pooling_method: str | None = None
    lora: LoraRef | None = None  # the LoRA adapter the sequence runs with
    # The prompt positions of this step to score (the request asked for prompt log-probabilities); None: none.
    prompt_logprobs: PromptLogprobSpan | None = None
    # Speculative decoding: the last ``num_draft_tokens`` of this step's tokens are drafts (``token_ids`` ends
    # with them), and the step samples at each of the last ``num_draft_tokens + 1`` positions.
    num_draft_tokens: int = 0
    long_rope: bool = False  # every token rotates by LongRoPE's long factors (``Request.long_rope``)
    token_type_start: int | None = None  # an encoder input's first position of token type 1 (None: all type 0)
    images: list[ImageInput] | None = None  # a vision-language prompt's images (``ImageInput``)
    prompt_embeds: PromptEmbeds | None = None  # a prompt given as embeddings (rows in place of its tokens)

    @property
    def embeds_rows(self) -> tuple[int, int] | None:
        """The prompt positions ``[start, stop)`` of this step that are given as embeddings; None when none is."""
        if self.prompt_embeds is None or self.num_computed_tokens >= self.prompt_embeds.length:
            return None
        return self.num_computed_tokens, min(self.num_computed_tokens + self.num_new_tokens, self.prompt_embeds.length)

    @property
    def decode_rows(self) -> int:
        """Decode rows the sequence runs as: one per new token when they are its next token plus its drafts (a
        decoding request, with or without drafts), else 0 (a multi-token span: a prompt chunk)."""
        return self.num_new_tokens if self.num_new_tokens == 1 + self.num_draft_tokens else 0


@dataclass(slots=True)
class StepRecord:
    """One scheduled step: its sequences, those running as decode rows first (one token, then with drafts)."""

    sequences: list[ScheduledSequence]
    num_batched_tokens: int
    # Structured output: called once the step's forward pass is queued (so on a GPU it runs while the device
    # computes), it returns the allowed tokens of the constrained sampled rows; None when no row is constrained.
    bitmask: Callable[[], TokenBitmask | None] | None = None

    @property
    def sampling_rows(self) -> list[SamplingRow]:
        """The sampling rows of the sequences sampled this step, in the order of the sampled tokens (a sequence
        with drafts has one per position it samples)."""
        return [s.sampling for s in self.sequences if s.samples for _ in range(1 + s.num_draft_tokens)]


@dataclass(slots=True, frozen=True)
class Layout:
    """Section sizes of the packed buffer: tokens, decode rows, sampled rows, block-table width."""

    tokens: int
    rows: int
    samples: int
    width: int
    prefill_table_len: int = 0

    @property
    def ids(self) -> int:
        return 0

    @property
    def positions(self) -> int:
        return self.tokens

    @property
    def slots(self) -> int:
        return 2 * self.tokens

    @property
    def seq_lens(self) -> int:
        return 3 * self.tokens

    @property
    def sample_rows(self) -> int:
        return 3 * self.tokens + self.rows

    @property
    def tables(self) -> int:
        return self.sample_rows + self.samples

    @property
    def prefill_tables(self) -> int:
        return self.tables + self.rows * self.width

    @property
    def size(self) -> int:
        return self.prefill_tables + self.prefill_table_len

    def used(self, num_rows: int) -> int:
        """Elements to copy when only the first ``num_rows`` decode rows are filled (graph layouts)."""
        if self.prefill_table_len:
            return self.size
        return self.tables + num_rows * self.width


@dataclass(slots=True)
class SpanInfo:
    """One multi-token span: where its tokens sit in the flat batch and where its block table is packed."""

    start: int
    num_tokens: int
    context_len: int
    table_offset: int
    num_blocks: int


@dataclass(slots=True)
class PackedStep:
    """A packed step: the buffer (already filled) plus what is needed to slice device views out of it."""

    layout: Layout
    num_tokens: int  # including padded decode rows
    num_decode: int  # decode rows including padding
    num_real_decode: int  # decode rows of the step's sequences (a sequence with drafts has several)
    spans: list[SpanInfo] = field(default_factory=list)
    num_samples: int = 0
    # True when the rows to sample are exactly 0..num_samples-1 (then no index tensor is needed).
    samples_are_prefix: bool = False
    # Decode rows whose input token is still being sampled by the step in flight, and that token's index
    # among that step's samples (asynchronous scheduling).
    pending_rows: list[int] = field(default_factory=list)
    pending_samples: list[int] = field(default_factory=list)
    # The sequences run as decode rows (the first ones of the step), and the first row of each when some of them
    # have drafts (None: one row each, row i for sequence i).
    num_decode_sequences: int = 0
    decode_row_starts: list[int] | None = None

    @property
    def shares_requests(self) -> bool:
        """Whether some request has several decode rows (drafts), which read keys other rows store."""
        return self.decode_row_starts is not None

    def first_row(self, index: int) -> int:
        """The first hidden-state row of the step's sequence ``index``."""
        if index >= self.num_decode_sequences:
            return self.spans[index - self.num_decode_sequences].start
        return index if self.decode_row_starts is None else self.decode_row_starts[index]


def decode_extent(items: list[ScheduledSequence]) -> tuple[int, int]:
    """How many of ``items`` (those that run as decode rows first) run as decode rows, and how many rows they
    take (more than one a sequence with drafts)."""
    n = rows = 0
    for it in items:
        new = it.num_new_tokens
        if new != 1 + it.num_draft_tokens:
            break
        n += 1
        rows += new
    return n, rows


def step_layout(items: list[ScheduledSequence], block_size: int, pad_rows: int | None = None,
                width: int | None = None) -> Layout:
    """The tightest layout for ``items`` (decode rows first), with decode rows padded to ``pad_rows`` if given."""
    num_seqs, num_decode = decode_extent(items)
    rows = max(pad_rows or 0, num_decode)
    tokens = sum(it.num_new_tokens for it in items) + rows - num_decode
    if width is None:
        width = max((len(it.block_ids) for it in items[:num_seqs]), default=0)
    prefill_len = sum(-(-(it.num_computed_tokens + it.num_new_tokens) // block_size)
                      for it in items[num_seqs:])
    samples = len(items) + sum(it.num_draft_tokens for it in items)  # room for every row a step may sample
    return Layout(tokens, rows, samples, width, prefill_len)


def pack_step(buf: np.ndarray, layout: Layout, items: list[ScheduledSequence], block_size: int,
              pad_rows: int | None, spare_block: int, rope_switch: LongRopeSwitch | None = None) -> PackedStep:
    """Fill ``buf`` (at least ``layout.size`` int64) with the step's inputs; ``items`` must list the sequences
    that run as decode rows (``ScheduledSequence.decode_rows``) first.

    ``pad_rows`` pads the decode rows up to that many (only for decode-only steps). ``rope_switch`` (a LongRoPE
    model's context past its original length): the positions section holds each token's rotary table row, which
    for the tokens of a long-rotation sequence below the original length is not its position. Decode rows never
    need it: a long-rotation sequence decodes past the original length, a short one below it.
    """
    num_seqs, num_decode = decode_extent(items)
    reqs = items[:num_seqs]
    rows = max(pad_rows or 0, num_decode)
    assert pad_rows is None or num_seqs == len(items), "only decode-only steps are padded"
    assert layout.rows >= rows and layout.tokens >= rows
    lo = layout
    out = PackedStep(lo, 0, rows, num_decode, num_decode_sequences=num_seqs)
    sample_rows: list[int] = []

    if rows:
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, num_seqs)
        tables = buf[lo.tables : lo.tables + rows * lo.width].reshape(rows, lo.width)
        tables.fill(0)
        shared = num_decode > num_seqs  # some request verifies drafts: several rows each
        seq_tables = np.zeros((num_seqs, lo.width), np.int64) if shared else tables
        lengths = np.fromiter((len(r.block_ids) for r in reqs), np.int64, num_seqs)
        total = int(lengths.sum())
        if total:
            flat = np.fromiter(itertools.chain.from_iterable(r.block_ids for r in reqs), np.int64, total)
            row_idx = np.repeat(np.arange(num_seqs), lengths)
            col_idx = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            seq_tables[row_idx, col_idx] = flat
        ids = buf[lo.ids : lo.ids + rows]
        if shared:
            counts = np.fromiter((r.num_new_tokens for r in reqs), np.int64, num_seqs)
            first = np.cumsum(counts) - counts
            owner = np.repeat(np.arange(num_seqs), counts)
            positions = starts[owner] + (np.arange(num_decode) - first[owner])
            tables[:num_decode] = seq_tables[owner]
            assert all(r.pending_sample < 0 for r in reqs), "a step verifying drafts has no token in flight"
            ids[:num_decode] = np.fromiter(
                itertools.chain.from_iterable(
                    r.token_ids[r.num_computed_tokens : r.num_computed_tokens + r.num_new_tokens] for r in reqs),
                np.int64, num_decode)
            out.decode_row_starts = first.tolist()
        else:
            positions = starts
            # A token still being sampled by the step in flight is not on the host: 0 here, and the runner copies
            # it from that step's device output (``pending_rows`` / ``pending_samples``).
            ids[:num_decode] = np.fromiter((r.token_ids[r.num_computed_tokens] if r.pending_sample < 0 else 0
                                            for r in reqs), np.int64, num_decode)
        buf[lo.positions : lo.positions + num_decode] = positions
        blocks = tables[np.arange(num_decode), positions // block_size]
        buf[lo.slots : lo.slots + num_decode] = blocks * block_size + positions % block_size
        buf[lo.seq_lens : lo.seq_lens + num_decode] = positions + 1
        if rows > num_decode:  # padding rows: token 0 at position 0, into and from the spare block
            ids[num_decode:] = 0
            buf[lo.positions + num_decode : lo.positions + rows] = 0
            buf[lo.slots + num_decode : lo.slots + rows] = spare_block * block_size
            buf[lo.seq_lens + num_decode : lo.seq_lens + rows] = 1
            tables[num_decode:, 0] = spare_block
        if shared:  # a sequence with drafts never has a token in flight (speculation schedules synchronously)
            for r, row in zip(reqs, out.decode_row_starts, strict=True):
                if r.samples:
                    sample_rows.extend(range(row, row + r.num_new_tokens))
        else:
            for i, r in enumerate(reqs):
                if r.pending_sample >= 0:
                    out.pending_rows.append(i)
                    out.pending_samples.append(r.pending_sample)
                if r.samples:
                    sample_rows.append(i)

    offset = rows
    table_offset = lo.prefill_tables
    for it in items[num_seqs:]:
        req, n = it, it.num_new_tokens
        start = req.num_computed_tokens
        positions = np.arange(start, start + n, dtype=np.int64)
        num_blocks = -(-(start + n) // block_size)
        blocks = np.asarray(req.block_ids[:num_blocks], dtype=np.int64)
        buf[lo.ids + offset : lo.ids + offset + n] = req.token_ids[start : start + n]
        buf[lo.positions + offset : lo.positions + offset + n] = positions
        if rope_switch is not None and req.long_rope and start < rope_switch.original:
            below = min(n, rope_switch.original - start)
            buf[lo.positions + offset : lo.positions + offset + below] += rope_switch.long_rows
        buf[lo.slots + offset : lo.slots + offset + n] = blocks[positions // block_size] * block_size + (
            positions % block_size)
        buf[table_offset : table_offset + num_blocks] = blocks
        out.spans.append(SpanInfo(offset, n, start, table_offset, num_blocks))
        table_offset += num_blocks
        offset += n
        if req.samples:
            sample_rows.extend(range(offset - 1 - req.num_draft_tokens, offset))

    out.num_tokens = offset
    num_samples = out.num_samples = len(sample_rows)
    assert num_samples <= lo.samples, f"{num_samples} sampled rows in a layout sized for {lo.samples}"
    buf[lo.sample_rows : lo.sample_rows + num_samples] = sample_rows
    out.samples_are_prefix = sample_rows == list(range(num_samples))
    return out


def step_views(dev: torch.Tensor, packed: PackedStep, block_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               AttentionMetadata]:
    """Input ids, positions and attention metadata as views of the step's packed tensor (no copies)."""
    lo, t, rows = packed.layout, packed.num_tokens, packed.num_decode
    tables = lens = None
    if rows:
        tables = dev[lo.tables : lo.tables + rows * lo.width].view(rows, lo.width)
        lens = dev[lo.seq_lens : lo.seq_lens + rows]
    prefills = [
        PrefillSpan(s.start, s.num_tokens, s.context_len, dev[s.table_offset : s.table_offset + s.num_blocks])
        for s in packed.spans
    ]
    metadata = AttentionMetadata(
        block_size=block_size,
        num_decode_tokens=rows,
        slot_mapping=dev[lo.slots : lo.slots + t],
        decode_block_tables=tables,
        decode_seq_lens=lens,
        prefills=prefills,
        decode_rows_share_requests=packed.shares_requests,
    )
    return dev[lo.ids : lo.ids + t], dev[lo.positions : lo.positions + t], metadata


def pooling_rows_of(items: list[ScheduledSequence], packed: PackedStep) -> list[PoolingRow]:
    """Where the embedding requests of a packed step sit in its hidden states, in ``items``' order (decode rows
    are rows ``0..``, each multi-token span starts where ``pack_step`` put it)."""
    return [PoolingRow(it.pooling_method, packed.first_row(index), it.num_new_tokens, it.num_computed_tokens,
                       len(it.token_ids))
            for index, it in enumerate(items) if it.pooling_method is not None]
