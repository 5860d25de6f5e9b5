"""What the model runner asks of a model: a small, explicit interface instead of reaching into its layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from inferneo.attention import AttentionMetadata
from inferneo.attention.kv_spec import KVCacheSpec
from inferneo.model_executor.models.llama import DecoderConfig


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM the runner can drive (``LlamaForCausalLM`` and its subclasses are one).

    ``config`` gives the architecture (layers, head size, hidden size, vocabulary); ``num_kv_heads`` the key/value
    heads each layer's cache holds on this rank; ``kv_cache_specs`` each layer's cache exactly (layers may differ).

    A model whose ``forward`` also takes ``input_embeds`` (the embeddings to start from instead of its lookup of
    ``input_ids``) sets ``accepts_prompt_embeds`` and turns a prompt's given embeddings into that lookup's output
    with ``prompt_embeds_to_hidden`` (``LlamaForCausalLM`` and its subclasses do): it takes prompt embeddings.
    """

    config: DecoderConfig

    @property
    def num_kv_heads(self) -> int: ...

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """What each layer keeps in the KV cache (shape and backend), one record per layer, on this rank."""

    def cast(self, dtype: torch.dtype) -> None:
        """Move the parameters to the compute dtype (buffers that must stay float32 stay so)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` for a flat batch; writes the new tokens' keys and values."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits of ``hidden``; None on tensor-parallel ranks other than the driver."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters; returns the load keys written (a fused
        parameter's shard as ``name#index``). ``strict``: ValueError unless every weight of the model came (a whole
        checkpoint); ``strict=False`` loads a part (a weight update). An unknown name or a wrong shape raises either
        way."""

    def expected_load_keys(self) -> set[str]:
        """Every load key a whole checkpoint writes (what ``load_weights`` returns for one)."""
