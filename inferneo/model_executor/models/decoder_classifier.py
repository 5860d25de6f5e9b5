"""Sequence classifiers on decoder bodies: Hugging Face's ``LlamaForSequenceClassification``,
``MistralForSequenceClassification``, ``Qwen2ForSequenceClassification``, ``Qwen3ForSequenceClassification``,
``Gemma2ForSequenceClassification`` and ``Phi3ForSequenceClassification`` (reward models, toxicity and intent
classifiers, one-label rerankers such as the Qwen3 and bge-gemma ones converted to classifiers).

The checkpoint holds the decoder (``model.*``) and ``score``, a linear layer without bias from the hidden size to
``num_labels``, applied to the last token's final hidden state. The body is the causal LM's class, unchanged; the
engine pools the last token as it does for decoder embeddings (so the prefix cache and chunked prefill apply) and
the runner puts the pooled rows through :meth:`classify` (``inferneo.pooling.pooler.apply_head``), as it does for
the BERT cross-encoders. The head is computed in float32 whatever the model dtype, as vLLM computes it, and is
never quantized. Such a model has no language-model head: it classifies, and with one label scores pairs,
but never generates (the tied input embeddings stand in for ``lm_head``, which nothing reads).

Hugging Face pools the rightmost token that is not ``pad_token_id``; the engine runs each input unpadded and pools
its last token, as vLLM does, so the two agree unless a prompt ends with the pad token itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.models.gemma import Gemma2ForCausalLM
from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM
from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM


def num_labels_of(cfg: dict) -> int:
    """A sequence classifier's number of labels: its ``id2label`` entries, else ``num_labels``, else 2 (Hugging
    Face's default)."""
    return len(cfg.get("id2label") or {}) or int(cfg.get("num_labels") or 2)


class SequenceClassifierMixin:
    """Turns a causal-LM class into its ``...ForSequenceClassification``: the same body, a ``score`` head, no
    language-model head. Put it first in the bases, before the causal LM."""

    config: DecoderConfig

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        """The body's config, with ``num_labels`` and the input embeddings tied to the (unused) ``lm_head``, which
        the checkpoint does not have."""
        config = super().config_from_hf(cfg)  # type: ignore[misc]
        return dataclasses.replace(config, tie_word_embeddings=True, num_labels=num_labels_of(cfg))

    def __init__(
        self, config: DecoderConfig, backend: AttentionBackend, max_position: int | None = None
    ) -> None:
        super().__init__(config, backend, max_position)  # type: ignore[call-arg]
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        # kept in float32 whatever the model dtype (as vLLM keeps its classifier heads), and never quantized
        self.score.quantizable = False

    def cast(self, dtype: torch.dtype) -> None:
        """As the causal LM's ``cast``, but ``score`` stays in float32."""
        super().cast(dtype)  # type: ignore[misc]
        self.score.float()

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, num_labels]`` of pooled last-token rows ``[n, hidden]``, computed in float32."""
        return self.score(pooled.float()).float()

    def checkpoint_name(self, key: str) -> str:
        """``score.weight`` is top-level in the checkpoint; the rest as the causal LM names it."""
        return key if key.startswith("score.") else super().checkpoint_name(key)  # type: ignore[misc]


class LlamaForSequenceClassification(SequenceClassifierMixin, LlamaForCausalLM):
    """Llama (and Mistral) with a ``score`` head."""


class Qwen2ForSequenceClassification(SequenceClassifierMixin, Qwen2ForCausalLM):
    """Qwen2 with a ``score`` head."""


class Qwen3ForSequenceClassification(SequenceClassifierMixin, Qwen3ForCausalLM):
    """Qwen3 with a ``score`` head."""


class Gemma2ForSequenceClassification(SequenceClassifierMixin, Gemma2ForCausalLM):
    """Gemma 2 with a ``score`` head (the final logit soft-cap is the language-model head's: not applied)."""


class Phi3ForSequenceClassification(SequenceClassifierMixin, Phi3ForCausalLM):
    """Phi-3 with a ``score`` head."""
