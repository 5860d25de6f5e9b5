"""A fast tokenizer rebuilt from the vocabulary a GGUF file carries in its metadata.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen, SmolLM, gpt-oss, Mistral Nemo,
DeepSeek LLM / V2 / V3, DeepSeek Coder, ...) are rebuilt here directly with the ``tokenizers`` library, in well under
a second. Anything else (SentencePiece vocabularies, pre-tokenizers not known here such as Command R's
``command-r``, with a logged warning) goes through transformers' own GGUF conversion, which knows more kinds; it is
called on the tokenizer alone (seconds for a 256k vocabulary; ``AutoTokenizer`` would first read the whole file's
metadata again through ``gguf.GGUFReader``, over a minute there, and refuse architectures transformers has no model
for). A vocabulary neither can build is refused with a message that says to pass ``--tokenizer``.

SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral 7B, TinyLlama, ...) come from
transformers' conversion with the space prefix of ``tokenizer.ggml.add_space_prefix`` (true unless the file says
otherwise) given to every run of text between special tokens that does not start with a space, so the chat prompt
``<s>[INST] hi`` is ``<s>``, ``▁[``, ... as llama.cpp and the Llama 2 / Mistral v0.1-v0.2 tokenizer.json files
have it, and ``[INST] hi`` with a special ``[INST]`` (Mistral v0.3) is ``[INST]``, ``▁hi`` as in its tokenizer.json
(llama.cpp adds a second ``▁`` there). transformers' own conversion prefixes the start of the text only. Gemma and
Phi-3 keep the layouts transformers builds for them, Phi-3 with its chat tokens swallowing the whitespace after them
(``rstrip`` in its tokenizer.json; llama.cpp does the same).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from inferneo.model_loader.gguf_file import read_gguf_header

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# Byte-level vocabularies to which llama.cpp adds a BOS when the file has no add_bos_token (Llama 3 files converted
# before the flag was read from tokenizer.json lack it): its Llama 3 pre-tokenizers, and Tekken
_BOS_BY_DEFAULT = ("llama-bpe", "llama3", "llama-v3", "falcon3", "tekken")
# architectures whose SentencePiece layout transformers' GGUF conversion builds for the model (not the generic one)
_OWN_SPM_LAYOUTS = ("gemma", "gemma2", "gemma3", "phi3")
_PHI3_KEEP_WHITESPACE = ("<unk>", "<s>", "<|endoftext|>")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# o200k (llama.cpp's "gpt-4o": gpt-oss): cased words keep their contraction, digits in runs of up to 3
_O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken (Mistral Nemo, Mistral Small 3): o200k's words without their contractions, every digit apart
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3 ("deepseek-v3"): three splits in turn: digit runs of up to 3, CJK runs, then words and punctuation
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)

# DeepSeek LLM / DeepSeek-V2 ("deepseek-llm") and DeepSeek Coder ("deepseek-coder"): line breaks alone; words of cased
# letters (deepseek-llm; any letters for deepseek-coder) or runs of ASCII, fullwidth and CJK punctuation, each with
# one leading space; trailing whitespace (deepseek-llm); runs of CJK (and U+0800-U+4E00) characters; digits (every
# digit apart for deepseek-coder)
_CJK_RUNS = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK_RUNS,
    r"\p{N}+",
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUNS, r"\p{N}")


def _split_then_bytes(*patterns: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False) for pattern in patterns),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer | None:
    """How text is cut before BPE, by llama.cpp's ``tokenizer.ggml.pre`` name (None: not known here)."""
    if pre in ("default", "gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"):
        return _split_then_bytes(_LLAMA3_SPLIT)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2_SPLIT)
    if pre == "gpt-4o":
        return _split_then_bytes(_O200K_SPLIT)
    if pre == "tekken":
        return _split_then_bytes(_TEKKEN_SPLIT)
    if pre == "deepseek-v3":
        return _split_then_bytes(*_DEEPSEEK_V3_SPLITS)
    if pre == "deepseek-llm":
        return _split_then_bytes(*_DEEPSEEK_LLM_SPLITS)
    if pre == "deepseek-coder":
        return _split_then_bytes(*_DEEPSEEK_CODER_SPLITS)
    return None


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer described by a GGUF file's metadata, with its special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_header(path).metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} carries no tokenizer; pass --tokenizer with a Hugging Face tokenizer folder")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    pre_tokenizer = _pre_tokenizer(pre)
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre_tokenizer is None:
        if meta.get("tokenizer.ggml.model") == "gpt2":
            logger.warning("%s: pre-tokenizer %r is not rebuilt here; transformers' GGUF conversion builds the "
                           "tokenizer (where it does not know the name either, text is split as GPT-2 splits it)",
                           path.name, pre)
        try:
            tok = _transformers_gguf_tokenizer(path)
        except ValueError as exc:
            raise ValueError(
                f"{path}: its tokenizer ({meta.get('tokenizer.ggml.model')!r} vocabulary, pre-tokenizer {pre!r}) is "
                f"not one Inferneo rebuilds, and transformers could not build it: {str(exc).splitlines()[0][:300]}; "
                "pass --tokenizer with the model's Hugging Face tokenizer folder") from None
        if meta.get("tokenizer.ggml.model") == "llama":
            arch = meta.get("general.architecture")
            if arch not in _OWN_SPM_LAYOUTS:
                _space_prefix_per_run(tok.backend_tokenizer, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            elif arch == "phi3":
                _phi3_strip_after_special(tok.backend_tokenizer, meta)
        if isinstance(template := _chat_template(meta), dict):
            tok.chat_template = template  # transformers' conversion keeps the default one only
        return tok
    backend = _byte_level_bpe(meta, pre, pre_tokenizer)
    tokens = meta["tokenizer.ggml.tokens"]

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos = special("bos")
    if meta.get("tokenizer.ggml.add_bos_token", pre in _BOS_BY_DEFAULT) and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                          special_tokens=[(bos, bos_id)]),
        ])
    kwargs: dict[str, Any] = {
        "bos_token": bos, "eos_token": special("eos"), "unk_token": special("unknown"),
        "pad_token": special("padding"), "clean_up_tokenization_spaces": False,
    }
    arch = meta.get("general.architecture")
    if (context := meta.get(f"{arch}.context_length")) is not None:
        kwargs["model_max_length"] = int(context)
    if (template := _chat_template(meta)) is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in kwargs.items() if v is not None})


def _chat_template(meta: Any) -> str | dict[str, str] | None:
    """The file's chat template: ``tokenizer.chat_template``, or where named ones stand beside it
    (``tokenizer.chat_templates`` lists their names, e.g. ``tool_use``, as llama.cpp's converter writes a
    tokenizer's several templates) a dict of them, the default one under ``default``: how transformers keeps several
    templates, rendering a request that carries tools with ``tool_use``."""
    default = meta.get("tokenizer.chat_template")
    named = {name: meta[f"tokenizer.chat_template.{name}"] for name in meta.get("tokenizer.chat_templates") or ()
             if f"tokenizer.chat_template.{name}" in meta}
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}


def _byte_level_bpe(meta: Any, pre: str, pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tokens: tuple[str, ...] = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
    # Llama 3's and Tekken's (tiktoken) vocabularies: a word that is in the vocabulary is that one token
    ignore_merges = pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "tekken")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=ignore_merges))
    if pre in ("qwen2", "deepseek-r1-qwen"):
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = meta.get("tokenizer.ggml.token_type") or ()
    control = [AddedToken(tok, special=True, normalized=False)
               for tok, kind in zip(tokens, token_types, strict=False) if kind == _CONTROL]
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=False) if kind == _USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return backend


def _space_prefix_per_run(backend: Tokenizer, add_space_prefix: bool) -> None:
    """Spaces of a SentencePiece vocabulary: each becomes ``▁``, and with ``add_space_prefix`` each run of text
    between special tokens that does not start with a space gets one in front (the pre-tokenizer runs on each run);
    decoding turns ``▁`` back into spaces and drops the one prefixed to the text."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="always" if add_space_prefix else "never")
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*pieces, decoders.Strip(" ", 1, 0)] if add_space_prefix else pieces)


def _phi3_strip_after_special(backend: Tokenizer, meta: Any) -> None:
    """Phi-3's chat tokens (``<|user|>``, ``<|end|>``, ``<|assistant|>``, ``</s>``, ...: its control and user-defined
    ones) swallow the whitespace after them, as its tokenizer.json says (``rstrip``) and llama.cpp does: its chat
    template's ``<|user|>\\n`` is the one token. ``<unk>``, ``<s>`` and ``<|endoftext|>`` keep what follows them."""
    pairs = list(zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or (), strict=False))
    for kind, add in ((_CONTROL, backend.add_special_tokens), (_USER_DEFINED, backend.add_tokens)):
        add([AddedToken(tok, special=kind == _CONTROL, normalized=False, rstrip=True)
             for tok, token_kind in pairs if token_kind == kind and tok not in _PHI3_KEEP_WHITESPACE])


def _transformers_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """transformers' conversion of the file's tokenizer metadata (the tokenizer alone: no model config is read)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(gguf_file=path.name, name_or_path=str(path.parent), local_files_only=True)
