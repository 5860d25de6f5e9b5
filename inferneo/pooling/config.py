"""How a model pools its hidden states into an embedding, read once from its folder.

A folder with sentence-transformers files (``modules.json`` listing a ``Pooling`` module whose
``config.json`` sets one of ``pooling_mode_mean_tokens``, ``pooling_mode_cls_token`` or
``pooling_mode_lasttoken``, and optionally a ``Normalize`` module, as ``Qwen3-Embedding`` ships) pools as those
files say. Any other decoder pools its last token and normalises the vector (as llama.cpp's and Ollama's
servers do); any other BERT-family encoder pools its first (CLS) token, normalised (vLLM's default for them). Modules we do not run (``Dense`` projections, max or weighted-mean pooling, ...) make the model
refuse embedding requests with a message saying why (generation is unaffected).

``dimensions`` (Matryoshka truncation) follows vLLM's rule: only a model whose ``config.json`` declares
``is_matryoshka: true`` or a ``matryoshka_dimensions`` list accepts it, the value must be in ``[1, hidden_size]``
and, when the list is given, one of its entries. The vector is truncated first and then normalised (when the
model normalises).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from inferneo.model_loader.source import ModelSource

PoolingMethod = Literal["mean", "cls", "last"]

# sentence-transformers' Pooling config keys, and the method each one selects
_MODES: dict[str, PoolingMethod] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens")
_POOLING_TYPE = "sentence_transformers.models.Pooling"
_NORMALIZE_TYPE = "sentence_transformers.models.Normalize"


class PoolingConfig(msgspec.Struct, array_like=True, frozen=True):
    """A model's pooling: ``method``, whether the vector is normalised (L2), its width, Matryoshka support, and
    ``unsupported`` (why embeddings are refused; None when they are served). ``source`` says where it came from
    (``"sentence-transformers"`` or ``"default"``)."""

    method: PoolingMethod = "last"
    normalize: bool = True
    hidden_size: int = 0
    matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None
    source: str = "default"
    unsupported: str | None = None
    # "embed": the pooled vector is the answer; "classify": a sequence classifier's logits (a cross-encoder, a
    # decoder ``...ForSequenceClassification``), which ``probabilities`` turns into class probabilities and, with
    # one label, ``score`` into a pair's score through ``activation`` ("sigmoid" or "identity")
    task: Literal["embed", "classify"] = "embed"
    activation: str = "identity"
    # why a classifier does not score pairs (more than one label, an activation not computed here); None: it does
    score_unsupported: str | None = None
    # a classifier's label names (``id2label``) in logit order; None where the config names none
    labels: list[str | None] | None = None

    def label(self, probs: list[float]) -> str | None:
        """The name of the likeliest class (vLLM's ``label`` of ``/classify``); None when the config names none."""
        if not self.labels or not probs:
            return None
        best = max(range(len(probs)), key=probs.__getitem__)
        return self.labels[best] if best < len(self.labels) else None

    def score(self, logits: list[float]) -> float:
        """A cross-encoder's score of one pair from its logits (one label): the activation of the logit."""
        logit = logits[0]
        return _sigmoid(logit) if self.activation == "sigmoid" else logit

    @staticmethod
    def probabilities(logits: list[float]) -> list[float]:
        """A classifier's class probabilities from its logits, as vLLM's ``classify`` gives them: the softmax over
        the labels, or the sigmoid of the logit when there is one label."""
        if len(logits) == 1:
            return [_sigmoid(logits[0])]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        return [e / total for e in exps]

    def dimensions_error(self, dimensions: int | None) -> str | None:
        """Why ``dimensions`` cannot be served (None when it can; None itself always can)."""
        if dimensions is None:
            return None
        if not self.matryoshka:
            return ("this model does not declare Matryoshka embeddings (is_matryoshka or matryoshka_dimensions in "
                    "its config.json), so its vectors cannot be shortened: leave dimensions out")
        if not 1 <= dimensions <= self.hidden_size:
            return f"dimensions must be between 1 and {self.hidden_size} (the model's width); got {dimensions}"
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            return f"this model serves dimensions {self.matryoshka_dimensions} only; got {dimensions}"
        return None


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for large negative ``x``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def load_pooling_config(model_dir: Path | None, hf_config: dict, hidden_size: int,
                        default_method: PoolingMethod = "last") -> PoolingConfig:
    """The pooling of the model in ``model_dir`` (None, e.g. a GGUF file: the default pooling). Without
    sentence-transformers files the model pools by ``default_method``, normalised: the last token for a decoder,
    the first (CLS) for a BERT-family encoder, as vLLM's defaults are."""
    matryoshka_dims = hf_config.get("matryoshka_dimensions")
    if not (isinstance(matryoshka_dims, list) and all(isinstance(d, int) for d in matryoshka_dims)):
        matryoshka_dims = None
    matryoshka = bool(hf_config.get("is_matryoshka")) or matryoshka_dims is not None
    common = dict(hidden_size=hidden_size, matryoshka=matryoshka, matryoshka_dimensions=matryoshka_dims)
    modules_file = model_dir / "modules.json" if model_dir is not None and model_dir.is_dir() else None
    if modules_file is None or not modules_file.is_file():
        return PoolingConfig(method=default_method, **common)
    try:
        modules = json.loads(modules_file.read_text())
        return _from_modules(model_dir, modules, common)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return PoolingConfig(source="sentence-transformers", unsupported=f"modules.json could not be read: {exc}",
                             **common)


def _from_modules(model_dir: Path, modules: list[dict], common: dict) -> PoolingConfig:
    types = [m.get("type", "") for m in modules]
    pooling = [m for m in modules if m.get("type") == _POOLING_TYPE]
    st = dict(source="sentence-transformers", **common)
    others = [t for t in types[1:] if t not in (_POOLING_TYPE, _NORMALIZE_TYPE)]
    if others:
        return PoolingConfig(unsupported=f"sentence-transformers modules {others} are not supported", **st)
    if len(pooling) != 1:
        return PoolingConfig(unsupported="modules.json must list exactly one Pooling module", **st)
    settings = json.loads((model_dir / pooling[0].get("path", "1_Pooling") / "config.json").read_text())
    chosen = [method for key, method in _MODES.items() if settings.get(key)]
    unsupported = [key for key in _UNSUPPORTED_MODES if settings.get(key)]
    if unsupported or len(chosen) != 1:
        return PoolingConfig(unsupported=f"pooling {unsupported or chosen} is not supported: one of mean, cls or "
                             "lasttoken is", **st)
    if settings.get("include_prompt", True) is False:
        return PoolingConfig(unsupported="pooling with include_prompt false is not supported", **st)
    return PoolingConfig(method=chosen[0], normalize=_NORMALIZE_TYPE in types, **st)


# sentence-transformers' CrossEncoder activations (config.json's ``sentence_transformers.activation_fn``)
_ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.modules.linear.Identity": "identity"}


def load_classifier_config(hf_config: dict, num_labels: int, method: PoolingMethod = "cls") -> PoolingConfig:
    """The pooling of a sequence classifier: its first token (``method`` "cls": a BERT-family cross-encoder) or
    its last ("last": a decoder) through its head, ``num_labels`` logits. It classifies with any number of labels;
    it scores pairs with one, the logit made a score by sentence-transformers' ``CrossEncoder`` activation: the
    ``activation_fn`` its ``config.json`` names, else sigmoid (CrossEncoder's and vLLM's default for one label)."""
    id2label = hf_config.get("id2label")
    names = {str(k): v for k, v in id2label.items()} if isinstance(id2label, dict) else {}
    labels = [names[str(i)] if isinstance(names.get(str(i)), str) else None for i in range(num_labels)]
    common = dict(method=method, normalize=False, hidden_size=num_labels, source="classifier", task="classify",
                  labels=labels)
    settings = hf_config.get("sentence_transformers")
    name = settings.get("activation_fn") if isinstance(settings, dict) else None
    if num_labels != 1:
        return PoolingConfig(score_unsupported=f"scoring needs a classifier of one label; this one has {num_labels}",
                             **common)
    if name is not None and name not in _ACTIVATIONS:
        return PoolingConfig(score_unsupported=f"the cross-encoder activation {name!r} is not supported; supported: "
                             f"{', '.join(_ACTIVATIONS)}", **common)
    return PoolingConfig(activation=_ACTIVATIONS.get(name, "sigmoid"), **common)


def lacks_output_head(source: ModelSource, hf_config: dict) -> bool:
    """Whether ``source`` is a checkpoint saved without its language-model head (as embedding models saved from
    the base model are, e.g. ``Qwen3-Embedding-4B``): untied embeddings and no ``lm_head`` tensor (of any kind: a
    quantized head is ``lm_head.qweight`` or ``lm_head.weight_packed``). Such a model
    loads with its input embeddings standing in for the head, and serves embeddings only."""
    if source.kind != "hf_dir" or not source.path.is_dir() or hf_config.get("tie_word_embeddings"):
        return False
    from inferneo.model_loader.hf_files import weight_names

    try:
        names = weight_names(source.path)
    except (OSError, ValueError):
        return False
    # A quantized head stores other tensors than ``weight`` (``lm_head.qweight``, ``lm_head.weight_packed``).
    return names is not None and not any(name.startswith("lm_head.") or ".lm_head." in name for name in names)
