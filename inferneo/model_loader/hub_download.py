"""Models fetched from the Hugging Face Hub into its cache, as ``vllm serve org/name`` fetches them.

Only what the engine reads is downloaded: the configs, the tokenizer's files, the chat template and one set of
weights (the ``*.safetensors`` files when the repository has them, else its PyTorch ``*.bin`` files), never
``original/`` copies, Mistral's ``consolidated`` files, ONNX exports or GGUF files. huggingface_hub does the
transfer (resumable, shared blobs, ``HF_TOKEN`` for gated repositories, ``HF_ENDPOINT`` for a mirror) and
``HF_HUB_OFFLINE=1`` turns downloading off.
"""

from __future__ import annotations

import logging
import os
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


def download_model(repo: str, revision: str | None, cache_dir: Path) -> Path:
    """The snapshot folder of ``repo`` at ``revision`` (default ``main``) in ``cache_dir``, downloading the files
    the engine reads; ``HubUnavailable`` when it cannot."""
    if downloads_disabled():
        raise HubUnavailable("downloads are off (HF_HUB_OFFLINE)")
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise HubUnavailable("huggingface_hub is not installed") from None
    try:
        files = HfApi().list_repo_files(repo, revision=revision)
        allow = [*_ALWAYS, *_weight_patterns(repo, files)]
        logger.info("downloading %s%s from the Hugging Face Hub into %s", repo,
                    f"@{revision}" if revision else "", cache_dir)
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                   ignore_patterns=_IGNORED)
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
    return Path(folder)


def _weight_patterns(repo: str, files: list[str]) -> list[str]:
    """The weights to fetch: safetensors when there are any (outside the ignored folders), else PyTorch files."""
    kept = [f for f in files if not any(fnmatch(f, pattern) for pattern in _IGNORED)]
    if "config.json" not in kept:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if ggufs:
            shown = ", ".join(ggufs[:6]) + (", ..." if len(ggufs) > 6 else "")
            raise HubUnavailable(f"{repo} holds GGUF files ({shown}), not a model folder: download the one you "
                                 f"want (`hf download {repo} FILE.gguf`) and pass its path")
        raise HubUnavailable(f"{repo} has no config.json: it is not a Hugging Face model folder")
    if any(f.endswith(".safetensors") for f in kept):
        return ["*.safetensors"]
    if any(f.endswith(".bin") for f in kept):
        return ["*.bin"]
    raise HubUnavailable(f"{repo} has no *.safetensors or *.bin weights")
