"""Tiny BERT-family encoders for tests and docs: random ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel``
weights saved by transformers, a real WordPiece tokenizer trained on the tiny models' built-in corpus (BERT's
``[CLS] ... [SEP]`` or RoBERTa's ``<s> ... </s>`` around the text), and optionally the sentence-transformers files
that make the folder an embedding model as all-MiniLM, bge or e5 ship it."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from inferneo.testing.embedding_models import write_sentence_transformers_files
from inferneo.testing.tiny_models import _CORPUS

ENCODER_ARCHITECTURES = ("bert", "roberta", "xlm_roberta")
# (cls, sep, pad, unk, mask) of each family; RoBERTa's pad id is 1, the padding_idx its positions count from
_SPECIALS = {
    "bert": ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"),
    "roberta": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
}


@functools.lru_cache(maxsize=4)
def _wordpiece_json(family: str) -> str:
    cls, sep, pad, unk, mask = _SPECIALS[family]
    order = [pad, unk, cls, sep, mask] if family == "bert" else [cls, pad, sep, unk, mask]
    backend = Tokenizer(models.WordPiece(unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, min_frequency=1, show_progress=False, special_tokens=order
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer)
    ids = {token: backend.token_to_id(token) for token in (cls, sep)}
    pair_sep = f"{sep}:1" if family == "bert" else f"{sep} {sep} $B:1 {sep}:1"
    pair = f"{cls} $A {sep} $B:1 {pair_sep}" if family == "bert" else f"{cls} $A {pair_sep}"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair, special_tokens=list(ids.items())
    )
    return backend.to_str()


def make_encoder_tokenizer(family: str = "bert") -> PreTrainedTokenizerFast:
    """A lowercasing WordPiece tokenizer of ``family`` "bert" (``[CLS]``/``[SEP]``, ``[PAD]`` id 0) or "roberta"
    (``<s>``/``</s>``, ``<pad>`` id 1), trained on the tiny models' corpus."""
    cls, sep, pad, unk, mask = _SPECIALS[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_wordpiece_json(family)),
        cls_token=cls,
        sep_token=sep,
        pad_token=pad,
        unk_token=unk,
        mask_token=mask,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        # BERT's tokenizers give a pair's second segment token type 1; RoBERTa's give no types
        model_input_names=["input_ids", "token_type_ids", "attention_mask"]
        if family == "bert"
        else ["input_ids", "attention_mask"],
    )


def make_tiny_encoder(
    path: Path,
    arch: str = "bert",
    pooling: str | None = "mean",
    *,
    normalize: bool = True,
    head: str | None = None,
    max_position_embeddings: int = 96,
    max_seq_length: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    hidden_act: str = "gelu",
    seed: int = 0,
    num_labels: int = 1,
) -> Path:
    """A tiny random ``arch`` ("bert", "roberta" or "xlm_roberta") encoder saved in ``path`` with its tokenizer;
    returns ``path``.

    ``pooling`` ("mean", "cls", "last"; None: a bare folder) writes the sentence-transformers files
    (``max_seq_length``: their ``sentence_bert_config.json`` value, default the positions the model has).
    ``head="masked_lm"`` saves ``BertForMaskedLM`` / ``RobertaForMaskedLM`` (prefixed weights and a head the
    embedding model skips); ``head="classifier"`` a ``...ForSequenceClassification`` of ``num_labels`` labels (one:
    a cross-encoder as sentence-transformers' ``CrossEncoder`` loads it). Every weight is perturbed away from transformers' initialisation (LayerNorms at 1
    and 0, token types alike) so that a wrong mapping shows in the vectors."""
    import transformers

    family = "bert" if arch == "bert" else "roberta"
    tokenizer = make_encoder_tokenizer(family)
    names = {"bert": "Bert", "roberta": "Roberta", "xlm_roberta": "XLMRoberta"}
    config_cls = getattr(transformers, f"{names[arch]}Config")
    heads = {None: "Model", "masked_lm": "ForMaskedLM", "classifier": "ForSequenceClassification"}
    model_cls = getattr(transformers, f"{names[arch]}{heads[head]}")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        hidden_act=hidden_act,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=2 if arch == "bert" else 1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels if head == "classifier" else 2,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if pooling is not None:
        offset = config.pad_token_id + 1 if family == "roberta" else 0
        write_sentence_transformers_files(
            path, pooling, hidden_size, normalize, max_seq_length or max_position_embeddings - offset
        )
    return path
