"""The on-disk record of CPU linear kernels measured at start-up, so that a machine measures each shape once.

One JSON file (default ``~/.cache/inferneo/cpu_tune.json``, or under ``$XDG_CACHE_HOME``; ``INFERNEO_CPU_TUNE_CACHE``
names another). An entry's key holds everything its answer depends on: the CPU model and flags, the PyTorch
version, a digest of Inferneo's native kernel sources, the thread count, the dtype, the layer's shape, the rows
measured and the kernels that were candidates. A different CPU, PyTorch, kernel source or thread count therefore
misses and measures again; nothing is ever read across them.
Writes replace the file atomically; a file that cannot be read or written costs a re-measure and a warning,
never a failed start.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inferneo import envs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_cache_path() -> Path:
    """``$INFERNEO_CPU_TUNE_CACHE``, else ``$XDG_CACHE_HOME/inferneo/cpu_tune.json`` (``~/.cache`` by default)."""
    named = envs.cpu_tune_cache()
    if named:
        return Path(named).expanduser()
    root = os.environ.get("XDG_CACHE_HOME", "").strip()
    if not root:
        try:
            root = Path.home() / ".cache"
        except (RuntimeError, KeyError):  # no home directory (a bare container user)
            root = Path(tempfile.gettempdir())
    return Path(root) / "inferneo" / "cpu_tune.json"


@dataclass(frozen=True, slots=True)
class TuneKey:
    """What one measured choice depends on."""

    cpu_model: str
    cpu_flags: str
    torch_version: str
    kernel_source: str  # digest of the native kernels' sources: a changed kernel is measured again
    threads: int
    dtype: str
    shape: str
    rows: tuple[int, ...]
    candidates: tuple[str, ...]

    def text(self) -> str:
        """The key as the JSON file stores it."""
        return json.dumps([self.cpu_model, self.cpu_flags, self.torch_version, self.kernel_source, self.threads,
                           self.dtype, self.shape, list(self.rows), list(self.candidates)], separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class TuneResult:
    """The kernel a tune chose and the seconds per call it measured: ``{kernel: [seconds at each row count]}``."""

    kernel: str
    seconds: dict[str, list[float]]


class TuneCache:
    """Measured choices in one JSON file (see the module doc); ``get`` and ``put`` never raise on I/O."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()
        self._entries: dict[str, dict] | None = None

    def get(self, key: TuneKey) -> TuneResult | None:
        """The stored result for ``key``, or None."""
        entry = self._load().get(key.text())
        if not isinstance(entry, dict) or entry.get("kernel") not in key.candidates:
            return None
        return TuneResult(entry["kernel"], dict(entry.get("seconds", {})))

    def put(self, key: TuneKey, result: TuneResult) -> None:
        """Store ``result`` for ``key`` (re-reading the file first, so entries other processes wrote are kept)."""
        self._entries = None
        entries = dict(self._load())
        entries[key.text()] = {"kernel": result.kernel, "seconds": result.seconds}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".cpu_tune.", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": FORMAT_VERSION, "entries": entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            logger.warning("could not write the CPU kernel tune cache %s (the next start measures again): %s",
                           self.path, exc)
            return
        self._entries = entries

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable CPU kernel tune cache %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(
                data.get("entries"), dict):
            return {}
        return data["entries"]
