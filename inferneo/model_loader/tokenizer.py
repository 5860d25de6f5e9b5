"""The tokenizer that goes with a model: from a Hugging Face folder or from a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from inferneo.model_executor.arch_presets import TokenIdTokenizer, is_preset_folder
from inferneo.model_loader.gguf_tokenizer import load_gguf_tokenizer
from inferneo.model_loader.hf_files import hf_config, hf_generation_config, read_json
from inferneo.model_loader.source import ModelRef, ModelSource, resolve_model

if TYPE_CHECKING:  # transformers takes seconds to import; only the tokenizer needs it
    from transformers import PreTrainedTokenizerBase

CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"  # a processor's template ({"chat_template": ...})


def load_tokenizer(source: ModelSource, tokenizer: str | ModelRef | None = None,
                   chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, or the one at ``tokenizer`` (a folder, .gguf file or hub id, or a ``ModelRef``: a
    hub id at its revision, from its cache: ``EngineConfig.tokenizer_ref()``) when given.

    When the tokenizer files name no EOS token, it is taken from the model's generation_config.json or
    config.json. The checkpoint's ``chat_template`` (tokenizer_config.json, chat_template.jinja or GGUF
    metadata) is set when there is one; ``chat_template`` (``--chat-template``: a file or the template itself)
    replaces it.
    """
    tok = _load_tokenizer(source, tokenizer)
    if chat_template is not None:
        tok.chat_template = chat_template_text(chat_template)
    return tok


def chat_template_text(value: str) -> str:
    """``--chat-template``'s template: the file's text when ``value`` names a file, else ``value`` itself when it is
    Jinja (it has ``{{`` or ``{%``). ``ValueError`` for anything else (a path that is not there) and for a template
    Jinja cannot parse, so a typo fails at start-up instead of at the first chat request."""
    import jinja2

    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"chat template {value!r} (--chat-template) is neither a file nor a Jinja template (no "
                         "'{{' or '{%' in it)")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{path}" if path.is_file() else "the template given"
        raise ValueError(f"chat template (--chat-template) does not parse: {where}, line {exc.lineno}: "
                         f"{exc.message}") from None
    return text


def _load_tokenizer(source: ModelSource, tokenizer: str | ModelRef | None) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_tokenizer`` describes, with the checkpoint's own chat template."""
    ref = ModelRef(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if ref is not None and ref.model is not None and _has_tokenizer_files(Path(ref.model).expanduser()):
        tok_source = ModelSource("hf_dir", Path(ref.model).expanduser(), ref.model)  # tokenizer files alone
    elif ref is not None:
        try:
            tok_source = resolve_model(ref.model, revision=ref.revision, download_dir=ref.download_dir,
                                       tokenizer_only=True)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"tokenizer {ref.model!r} (--tokenizer) was not found: no tokenizer files there, "
                                    f"and as a model: {exc}") from None
    else:
        tok_source = source
    path = tok_source.path
    if tok_source.kind == "hf_dir" and is_preset_folder(path) and not _has_tokenizer_files(path):
        config = hf_config(path)
        return TokenIdTokenizer(config["vocab_size"], config.get("eos_token_id"), config.get("bos_token_id"),
                                name=source.name)
    tok = load_gguf_tokenizer(path) if tok_source.kind == "gguf" else _load_hf_tokenizer(path)
    if tok.eos_token_id is None:
        _set_eos_from_configs(tok, source)
    return tok


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                      "tokenizer.model", "vocab.json"))


def _load_hf_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                                "pass --tokenizer with a folder that has them")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError) as exc:  # e.g. tokenizer_config.json without the tokenizer.json it needs
        present = sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges")))
        raise ValueError(f"the tokenizer in {folder} cannot be loaded (its files: {', '.join(present) or 'none'}; "
                         "a fast tokenizer needs tokenizer.json): pass --tokenizer with a folder that has a "
                         f"complete tokenizer. transformers said: {str(exc).splitlines()[0][:300]}") from None
    if tok.chat_template is None:
        template_file = folder / CHAT_TEMPLATE_FILE
        config_file = folder / "tokenizer_config.json"
        processor_file = folder / PROCESSOR_CHAT_TEMPLATE_FILE  # vision-language repositories keep it here
        if template_file.is_file():
            tok.chat_template = template_file.read_text(encoding="utf-8")
        elif config_file.is_file() and isinstance(template := read_json(config_file).get("chat_template"), str) or processor_file.is_file() and isinstance(template := read_json(processor_file).get("chat_template"),
                                                     str):
            tok.chat_template = template
    return tok


def _set_eos_from_configs(tok: PreTrainedTokenizerBase, source: ModelSource) -> None:
    if source.kind != "hf_dir":
        return
    for config in (hf_generation_config(source.path), hf_config(source.path)):
        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            tok.eos_token = tok.convert_ids_to_tokens(eos)
            return
