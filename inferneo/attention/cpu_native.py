"""The CPU backend: native kernels store keys and values and run attention over the paged cache.

One layer's cache is ``[2, num_kv_heads, num_blocks, block_size * head_dim]``. A value block is token-major
(``[block_size, head_dim]``); a key block is stored dimension-major (``[head_dim, block_size]``) so that the
kernel scores 16 tokens with one vector load per dimension.

Every token of the step, decoding or not, goes through the same paged kernel as one query: token ``j`` of a span
with ``c`` cached tokens attends to the first ``c + j + 1`` tokens of its request's blocks. Prompts, chunks of
prompts and prefix-cache hits are then one call with no gather of cached blocks and no copies into SDPA's layout;
on this project's 2-core test machine it ran 1.1-4x faster than SDPA for prompts of 2,048 down to 16 tokens
(``benchmarks/cpu_prefill_step.py``). Shapes the vector kernel does not cover (head or block sizes that are
not multiples of 16) keep PyTorch's SDPA for multi-token spans, unless the layer has a sliding window, soft-capping
or sinks: those are computed in the paged kernel only (a window starts each query's scan at its first visible
token, soft-capping squashes each score, a sink joins the final denominator), and so are FP8 caches (the kernel
reads float8 e4m3 elements with per-head scales directly; ``store_kv`` quantizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferneo.attention.backend import AttentionFeature, AttentionMetadata
from inferneo.attention.fp8_kv import is_fp8_kv_cache
from inferneo.attention.torch_ref import TorchReferenceBackend
from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu import cpu_kernels
from inferneo.kernels.cpu_features import cpu_features
from inferneo.kernels.cpu_select import prompt_attention_sdpa_min_tokens


class CpuNativeBackend(TorchReferenceBackend):
    name = "cpu"
    needs_decode_mask = False
    #: The CPU features the prompt-attention choice reads (None: this machine's).
    sdpa_features = None
    supported_features = frozenset(AttentionFeature) - {AttentionFeature.IMAGE_BLOCKS}

    def __init__(self, kernels: KernelConfig | None = None) -> None:
        """``kernels``: the engine's switches (None: the environment's); RuntimeError when ``cpu_native_kernels``
        is off or the kernels do not build here."""
        self.kernels = cpu_kernels(kernels)
        if self.kernels is None:
            raise RuntimeError("the native CPU kernels are switched off or could not be loaded")

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_kv_heads, num_blocks, block_size * head_dim)

    def prepare(self, metadata: AttentionMetadata) -> None:
        """One block-table row per request and a (row, length) pair per token, for steps with multi-token spans."""
        spans = metadata.prefills
        if not spans:
            return
        nd = metadata.num_decode_tokens
        decode_width = metadata.decode_block_tables.shape[1] if nd else 0
        width = max(decode_width, max(len(span.block_table) for span in spans))
        num_tokens = spans[-1].start + spans[-1].num_tokens
        tables = torch.zeros((nd + len(spans), width), dtype=torch.long)
        rows = torch.empty(num_tokens, dtype=torch.long)
        lens = torch.empty(num_tokens, dtype=torch.long)
        if nd:
            tables[:nd, :decode_width] = metadata.decode_block_tables
            rows[:nd] = torch.arange(nd)
            lens[:nd] = metadata.decode_seq_lens
        for i, span in enumerate(spans):
            s, e = span.start, span.start + span.num_tokens
            tables[nd + i, : len(span.block_table)] = span.block_table
            rows[s:e] = nd + i
            torch.arange(span.context_len + 1, span.context_len + span.num_tokens + 1, out=lens[s:e])
        metadata.extra["cpu_paged"] = (tables, rows, lens)

    def forward(self, q, k, v, kv_cache, metadata, scale, *, sliding_window=None, logit_softcap=None, sinks=None,
                kv_scales=None):
        num_tokens, num_heads, head_dim = q.shape
        if (not metadata.prefills and metadata.num_decode_tokens == num_tokens and sliding_window is None
                and logit_softcap is None and sinks is None and kv_scales is None and not is_fp8_kv_cache(kv_cache)):
            # A step of decode rows only, plain attention on a 16-bit or float32 cache (the common step), without
            # the general path's per-call work (a few microseconds of Python a layer). With the cache in q's dtype,
            # one call stores each row's new key and value as that row's attention reads its blocks (unless rows
            # of one request read each other's keys: drafts, stored first).
            out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype)
            if kv_cache.dtype == q.dtype and not metadata.decode_rows_share_requests:
                self.kernels.store_kv_and_decode(k, v, kv_cache, metadata.slot_mapping, q,
                                                 metadata.decode_block_tables, metadata.decode_seq_lens, scale, out)
                return out
            self.kernels.store_kv(k, v, kv_cache, metadata.slot_mapping)
            self.kernels.paged_decode_attention(q, kv_cache, metadata.decode_block_tables, metadata.decode_seq_lens,
                                                scale, out)
            return out
        fp8 = is_fp8_kv_cache(kv_cache)
        if fp8 and kv_scales is None:
            raise ValueError("an FP8 KV cache needs the layer's kv_scales")
        cache_scales = dict(k_scale=kv_scales.k, v_scale=kv_scales.v) if fp8 else {}
        self.kernels.store_kv(k, v, kv_cache, metadata.slot_mapping, **cache_scales)
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
        options = dict(sliding_window=sliding_window or 0, logit_softcap=logit_softcap or 0.0,
                       sinks=None if sinks is None else sinks.float(), **cache_scales)
        plain = sliding_window is None and logit_softcap is None and sinks is None
        paged = metadata.extra.get("cpu_paged")
        if paged is None and metadata.prefills:
            self.prepare(metadata)
            paged = metadata.extra["cpu_paged"]
        # Windows, soft-capping, sinks and FP8 caches live in the paged kernel only: every token goes through it
        # then, whatever the shapes (the scalar kernel covers those the vector one does not).
        if paged is not None and (fp8 or not plain or (head_dim % 16 == 0 and metadata.block_size % 16 == 0)):
            tables, rows, lens = paged
            sdpa_min = self.prompt_sdpa_min_tokens(q.dtype) if plain and not fp8 else None
            fresh_long = [span for span in metadata.prefills
                          if sdpa_min is not None and span.context_len == 0 and span.num_tokens >= sdpa_min]
            if not fresh_long:
                self.kernels.paged_decode_attention(q, kv_cache, tables, lens, scale, out, rows, **options)
                return out
            # Long fresh prompts through SDPA (the CPU's choice, prompt_attention_sdpa_min_tokens), every other
            # token through the paged kernel in runs of consecutive rows.
            start = 0
            for span in [*fresh_long, None]:
                stop = span.start if span is not None else num_tokens
                if stop > start:
                    self.kernels.paged_decode_attention(q[start:stop], kv_cache, tables, lens[start:stop], scale,
                                                        out[start:stop], rows[start:stop], **options)
                if span is not None:
                    start = span.start + span.num_tokens
            self._fresh_prompts_sdpa(q, k, v, out, fresh_long, scale)
            return out
        if metadata.prefills and "prefill_masks" not in metadata.extra:
            super().prepare(metadata)  # the SDPA path's masks for spans with cached context
        nd = metadata.num_decode_tokens
        if nd:
            self.kernels.paged_decode_attention(
                q[:nd], kv_cache, metadata.decode_block_tables, metadata.decode_seq_lens, scale, out[:nd],
                **options,
            )
        gqa = num_heads != k.shape[1]
        fresh = []  # prompts with no cached context
        for span, mask in zip(metadata.prefills, metadata.extra.get("prefill_masks", ()), strict=True):
            if mask is None:
                fresh.append(span)
                continue
            s, e = span.start, span.start + span.num_tokens
            ks, vs = self.gather_context(kv_cache, span.block_table, span.context_len + span.num_tokens, head_dim)
            # A leading batch dimension keeps SDPA on its fused CPU kernel (a 3-D call with GQA takes the slow path).
            attn = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, scale=scale, enable_gqa=gqa,
            )
            out[s:e] = attn[0].transpose(0, 1)
        self._fresh_prompts_sdpa(q, k, v, out, fresh, scale)
        return out

    def prompt_sdpa_min_tokens(self, dtype: torch.dtype) -> int | None:
        """From how many tokens a fresh prompt's attention takes SDPA on this CPU in ``dtype`` (None: never); a
        test sets ``sdpa_features`` to choose for another CPU."""
        return prompt_attention_sdpa_min_tokens(self.sdpa_features or cpu_features(), dtype)

    @staticmethod
    def _fresh_prompts_sdpa(q, k, v, out, spans, scale) -> None:
        """Causal SDPA over ``spans`` (prompts with no cached context), one call per prompt length, into ``out``."""
        gqa = q.shape[1] != k.shape[1]
        by_length: dict[int, list[int]] = {}
        for span in spans:
            by_length.setdefault(span.num_tokens, []).append(span.start)
        for length, starts in by_length.items():
            # [spans, heads, length, head_dim] views or stacks of the spans' rows
            qs, ks, vs = (_stack_spans(x, starts, length) for x in (q, k, v))
            attn = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            for i, start in enumerate(starts):
                out[start : start + length] = attn[i].transpose(0, 1)

    @staticmethod
    def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, head_dim: int):
        """Keys and values of the first ``length`` tokens of a request, each ``[num_kv_heads, length, head_dim]``."""
        num_kv_heads = kv_cache.shape[1]
        blocks = kv_cache.index_select(2, block_table)  # [2, Hkv, n, block_size * head_dim]
        block_size = kv_cache.shape[3] // head_dim
        keys = blocks[0].view(num_kv_heads, -1, head_dim, block_size).transpose(2, 3).reshape(num_kv_heads, -1, head_dim)
        values = blocks[1].view(num_kv_heads, -1, head_dim)
        return keys[:, :length], values[:, :length]


def _stack_spans(x: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """Rows ``start .. start + length`` of ``x`` ([tokens, heads, dim]) for each start, as [spans, heads, length,
    dim]; a view when there is a single span."""
    if len(starts) == 1:
        return x[starts[0] : starts[0] + length].transpose(0, 1).unsqueeze(0)
    return torch.stack([x[s : s + length] for s in starts]).transpose(1, 2)
