"""Models fetched from the Hugging Face Hub into its cache, as ``vllm serve org/name`` fetches them.

Only what the engine reads is downloaded: the configs, the tokenizer's files, the chat template and one set of
weights (the ``*.safetensors`` files when the repository has them, else its PyTorch ``*.bin`` files), never
``original/`` copies, Mistral's ``consolidated`` files, ONNX exports or GGUF files. From a repository of GGUF
files, ``org/name:QUANT`` (vLLM's and llama.cpp's spelling, e.g. ``unsloth/Qwen3-0.6B-GGUF:Q4_K_M``) fetches the
one file of that quantization type. huggingface_hub does the
transfer (resumable, shared blobs, ``HF_TOKEN`` for gated repositories, ``HF_ENDPOINT`` for a mirror) and
``HF_HUB_OFFLINE=1`` turns downloading off.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

logger = logging.getLogger(__name__)

_ALWAYS = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
_IGNORED = ["original/*", "consolidated*", "onnx/*", "*.onnx", "*.gguf", "*.msgpack", "*.h5", "*.ot"]


class HubUnavailable(Exception):
    """The model could not be fetched; the message says why (offline, not found, gated, no connection)."""


def downloads_disabled() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download_model(repo: str, revision: str | None, cache_dir: Path, *, weights: bool = True) -> Path:
    """The snapshot folder of ``repo`` at ``revision`` (default ``main``) in ``cache_dir``, downloading the files
    the engine reads (without the weights when ``weights`` is false: for a tokenizer); ``HubUnavailable`` when it
    cannot."""
    if downloads_disabled():
        raise HubUnavailable("downloads are off (HF_HUB_OFFLINE)")
    from huggingface_hub import HfApi, snapshot_download

    with _hub_errors(repo, revision):
        files = HfApi().list_repo_files(repo, revision=revision)
        allow = [*_ALWAYS, *(_weight_patterns(repo, files) if weights else [])]
        logger.info("downloading %s%s from the Hugging Face Hub into %s", repo,
                    f"@{revision}" if revision else "", cache_dir)
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                   ignore_patterns=_IGNORED)
    return Path(folder)


def download_gguf(repo: str, quant: str, revision: str | None, cache_dir: Path) -> Path:
    """The one ``.gguf`` file of quantization type ``quant`` in ``repo`` (see :func:`pick_gguf`), downloaded into
    ``cache_dir``; ``HubUnavailable`` when it cannot be."""
    if downloads_disabled():
        raise HubUnavailable("downloads are off (HF_HUB_OFFLINE)")
    from huggingface_hub import HfApi, hf_hub_download

    with _hub_errors(repo, revision):
        name = pick_gguf(repo, HfApi().list_repo_files(repo, revision=revision), quant)
        logger.info("downloading %s from %s%s on the Hugging Face Hub into %s", name, repo,
                    f"@{revision}" if revision else "", cache_dir)
        return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))


def pick_gguf(repo: str, files: list[str], quant: str) -> str:
    """The file of ``files`` whose name ends in the quantization type ``quant`` (``Qwen3-0.6B-Q4_K_M.gguf`` for
    ``q4_k_m``; multimodal projectors left out); ``HubUnavailable`` naming the types there are when none or several
    (a split model) match."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    wanted = quant.lower()
    matches = [f for f in ggufs if re.search(rf"(^|[-_./]){re.escape(wanted)}$", f.lower().removesuffix(".gguf"))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        split = [f for f in ggufs if re.search(rf"{re.escape(wanted)}[-_.]0*1-of-\d+\.gguf$", f.lower())]
        if split:
            raise HubUnavailable(f"{repo}'s {quant} model is split over several files ({split[0]}, ...), which "
                                 "Inferneo does not load: merge them with llama.cpp's gguf-split --merge")
        types = sorted({_quant_type(f) for f in ggufs} - {""})
        raise HubUnavailable(f"{repo} has no {quant} file; its GGUF files are of the types "
                             f"{', '.join(types) or '(none)'}")
    raise HubUnavailable(f"{repo} has several {quant} files ({', '.join(matches)}): download the one you want "
                         "and pass its path")


def _quant_type(name: str) -> str:
    match = re.search(r"[-_.]((?:UD-)?I?Q\d\w*|F16|F32|BF16)$", name.removesuffix(".gguf"), re.IGNORECASE)
    return match[1] if match else ""


@contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors (and a connection's) as ``HubUnavailable`` with a message a user can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubUnavailable(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubUnavailable(f"{repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubUnavailable(f"no repository {repo} (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as exc:
        raise HubUnavailable(f"the Hub answered: {exc}") from None
    except OSError as exc:  # no connection, no space, ...
        raise HubUnavailable(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise HubUnavailable(f"cannot reach the Hub: {type(exc).__name__}: {exc}") from None
        raise


def _weight_patterns(repo: str, files: list[str]) -> list[str]:
    """The weights to fetch: safetensors when there are any (outside the ignored folders), else PyTorch files."""
    kept = [f for f in files if not any(fnmatch(f, pattern) for pattern in _IGNORED)]
    if "config.json" not in kept:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if ggufs:
            shown = ", ".join(ggufs[:6]) + (", ..." if len(ggufs) > 6 else "")
            raise HubUnavailable(f"{repo} holds GGUF files ({shown}), not a model folder: name one by its "
                                 f"quantization type ({repo}:Q4_K_M), or download it and pass its path")
        raise HubUnavailable(f"{repo} has no config.json: it is not a Hugging Face model folder")
    if any(f.endswith(".safetensors") for f in kept):
        return ["*.safetensors"]
    if any(f.endswith(".bin") for f in kept):
        return ["*.bin"]
    raise HubUnavailable(f"{repo} has no *.safetensors or *.bin weights")
