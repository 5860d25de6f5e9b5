"""The model runner: owns the model and the KV tensors, packs a step into one forward pass, samples.

It knows nothing of queues or policies: it receives the scheduler's output (which requests, how many new
tokens each) and returns one sampled token for every request whose known tokens are now all computed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from inferneo import envs
from inferneo.attention import (
    AttentionMetadata,
    PrefillSpan,
    default_attention_backend,
    get_attention_backend,
)
from inferneo.engine.request import Request
from inferneo.engine.scheduler import SchedulerOutput
from inferneo.model_executor.layers.cpu_linear import pack_linears
from inferneo.model_executor.models.llama import LlamaForCausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.sampling import Sampler, SamplingMetadata
from inferneo.worker.cpu_tuning import keep_freed_memory_mapped

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunnerOutput:
    """Tokens sampled this step, in the order of ``requests``."""

    requests: list[Request]
    sampled_token_ids: list[int]
    logprob_token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None
    sampled_token_ranks: list[int] | None = None


class ModelRunner:
    """Builds the model on its device and executes scheduled steps."""

    def __init__(
        self,
        hf_config: dict,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        attention_backend: str | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        if device.type == "cpu":
            keep_freed_memory_mapped()
        self.block_size = block_size
        model_cls = get_model_class(hf_config)
        self.model_config = model_cls.config_from_hf(hf_config)
        if attention_backend is None:
            self.backend = default_attention_backend(device)
        else:
            self.backend = get_attention_backend(attention_backend)
        with torch.device(device):
            self.model: LlamaForCausalLM = model_cls(self.model_config, self.backend, max_position=max_model_len)
        self.model.to(dtype=dtype)
        # Rotary tables stay in float32 whatever the model dtype.
        for module in self.model.modules():
            if hasattr(module, "cos_cache"):
                module.float()
        self.model.eval()
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    # ---- weights and cache -------------------------------------------------------------------------------

    def load_weights(self, weights) -> None:
        start = time.perf_counter()
        self.model.load_weights(weights)
        logger.info("loaded weights in %.1f s", time.perf_counter() - start)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights from the config alone (for benchmarks of real architectures)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name, param in self.model.named_parameters():
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-0.02, 0.02, generator=gen)

    def finalize_weights(self) -> None:
        """Transforms that need the final weights: on CPU, pack linear layers for oneDNN."""
        if self.device.type == "cpu" and envs.cpu_onednn_linear():
            count = pack_linears(self.model)
            logger.info("packed %d linear layers for oneDNN", count)

    @property
    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        # Zeros, not empty: masked-out slots are multiplied by zero weights and must not hold NaNs.
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.num_blocks = num_blocks

    # ---- one step ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first, stable
        bs = self.block_size
        token_chunks, pos_chunks, slot_chunks = [], [], []
        decode_tables, decode_lens = [], []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        offset = 0
        for item in items:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            positions = np.arange(start, start + n)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            token_chunks.append(req.all_token_ids[start : start + n])
            pos_chunks.append(positions)
            slot_chunks.append(blocks[positions // bs] * bs + positions % bs)
            if n == 1:
                decode_tables.append(req.block_ids)
                decode_lens.append(start + 1)
            else:
                num_blocks = -(-(start + n) // bs)
                prefills.append(PrefillSpan(offset, n, start, torch.from_numpy(blocks[:num_blocks]).to(self.device)))
            offset += n
            if start + n == req.num_tokens:
                sample_rows.append(offset - 1)
                sample_requests.append(req)

        dev = self.device
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_chunks)).to(dev)
        slot_mapping = torch.from_numpy(np.concatenate(slot_chunks)).to(dev)
        tables = lens = None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            padded = np.zeros((len(decode_tables), width), dtype=np.int64)
            for i, t in enumerate(decode_tables):
                padded[i, : len(t)] = t
            tables = torch.from_numpy(padded).to(dev)
            lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
        metadata = AttentionMetadata(
            block_size=bs,
            num_decode_tokens=len(decode_tables),
            slot_mapping=slot_mapping,
            decode_block_tables=tables,
            decode_seq_lens=lens,
            prefills=prefills,
        )
        self.backend.prepare(metadata)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        if not sample_rows:
            return RunnerOutput([], [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        sampling = SamplingMetadata.build(sample_requests, self.model_config.vocab_size, dev)
        result = self.sampler(logits, sampling)
        out = RunnerOutput(sample_requests, result.sampled_token_ids.tolist())
        if result.logprobs is not None:
            out.logprob_token_ids = result.logprob_token_ids.tolist()
            out.logprobs = result.logprobs.tolist()
            out.sampled_token_ranks = result.sampled_token_ranks.tolist()
        return out
