"""Cross-encoders (rerankers): RoBERTa / XLM-RoBERTa sequence classifiers such as bge-reranker-base and
bge-reranker-v2-m3, which read a (query, document) pair as one input and score it.

The encoder is the embedding model's (``bert.py``); the head is Hugging Face's ``RobertaClassificationHead``:
the first token's (``<s>``) last hidden state through ``dense``, tanh and ``out_proj``, giving ``num_labels``
logits. The engine pools the first token as it does for CLS embeddings and the runner puts the pooled rows through
:meth:`RobertaCrossEncoder.classify`; the front end turns the logit into a score (``inferneo.pooling``).
BERT's (``BertForSequenceClassification``, e.g. the ms-marco-MiniLM cross-encoders) read the document as token
type 1 (the engine sends each pair's first type-1 position with the request) and score through BERT's pooler
(``dense`` and tanh) and a linear ``classifier``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.models.bert import BertEmbeddingModel, EncoderConfig, RobertaEmbeddingModel

_HEAD = re.compile(r"classifier\.(dense|out_proj)\.(weight|bias)")


class ClassificationHead(nn.Module):
    """``out_proj(tanh(dense(x)))``, as Hugging Face's RoBERTa classification head (dropout is off at inference)."""

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class RobertaCrossEncoder(RobertaEmbeddingModel):
    """``RobertaForSequenceClassification`` / ``XLMRobertaForSequenceClassification``: the RoBERTa encoder and its
    classification head."""

    def __init__(
        self, config: EncoderConfig, backend: AttentionBackend | None = None, max_position: int | None = None
    ) -> None:
        super().__init__(config, backend, max_position)
        self.classifier = ClassificationHead(config.hidden_size, config.num_labels)

    def head_weight(self, name: str) -> str | None:
        return name if _HEAD.fullmatch(name) else None

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, num_labels]`` of pooled first-token rows ``[n, hidden]``."""
        dtype = self.embeddings.word_embeddings.weight.dtype
        return self.classifier(pooled.to(dtype)).float()


_BERT_HEAD = re.compile(r"(pooler\.dense|classifier)\.(weight|bias)")


class BertCrossEncoder(BertEmbeddingModel):
    """``BertForSequenceClassification``: the BERT encoder, its pooler (``dense``, tanh) on the first token and a
    linear classifier."""

    def __init__(
        self, config: EncoderConfig, backend: AttentionBackend | None = None, max_position: int | None = None
    ) -> None:
        super().__init__(config, backend, max_position)
        self.pooler = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.hidden_size)})
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head_weight(self, name: str) -> str | None:
        return name if _BERT_HEAD.fullmatch(name) else None

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, num_labels]`` of pooled first-token rows ``[n, hidden]``."""
        dtype = self.embeddings.word_embeddings.weight.dtype
        return self.classifier(torch.tanh(self.pooler["dense"](pooled.to(dtype)))).float()
