"""Building the native CPU extensions with PyTorch's C++ extension tooling, safe against a build that was killed.

``torch.utils.cpp_extension.load`` guards each extension's build folder with a ``lock`` file that it creates
before compiling and deletes afterwards; a process that sees the file waits until it is gone. A start that is
killed while it compiles (Ctrl-C twice, a container stopped, an out-of-memory kill) leaves the file behind, and
every later start then waits forever. :func:`load_extension` therefore takes an operating-system file lock of its
own (``flock``, beside the build folder) around the build: the kernel releases it when its holder dies, so a
process that holds it knows that no other Inferneo build is running, and a ``lock`` file it finds is stale: it is
removed with a warning. Builds by other programs under the same extension name do not take this lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: PyTorch's own lock only
    fcntl = None

logger = logging.getLogger(__name__)


def extension_build_dir(name: str) -> Path:
    """The folder PyTorch builds extension ``name`` in (under ``TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions/<python>_<accelerator>/``)."""
    from torch.utils import cpp_extension

    getter = getattr(cpp_extension, "_get_build_directory", None)  # private: PyTorch's own layout where it exists
    if getter is not None:
        return Path(getter(name, verbose=False))
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name


def extension_name(name: str, sources: list[str]) -> str:
    """``name`` tagged with where ``sources`` lie. PyTorch rebuilds an extension whenever its sources' paths change,
    so two installs (checkouts, virtual environments) of the package on one machine would otherwise rebuild one
    build folder in turn, each start waiting for the other's compile; with the tag each has its own."""
    where = hashlib.sha256("\0".join(str(Path(source).resolve()) for source in sources).encode())
    return f"{name}_{where.hexdigest()[:8]}"


def headers_digest(sources: list[str]) -> str:
    """A digest of the ``.h`` files beside ``sources``. PyTorch rebuilds an extension when its sources or build
    flags change, not when a header they include does; :func:`load_extension` passes this digest as a define, so an
    edited header rebuilds the extensions too."""
    digest = hashlib.sha256()
    for folder in sorted({Path(source).parent for source in sources}):
        for header in sorted(folder.glob("*.h")):
            digest.update(header.name.encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()[:16]


def sources_digest(sources: list[str]) -> str:
    """A short digest of ``sources`` and the headers beside them (:func:`headers_digest`), "unknown" when a source
    cannot be read: part of the key of every measured kernel choice, so that a changed kernel is timed again rather
    than judged by its old figures."""
    digest = hashlib.sha256()
    try:
        for source in sources:
            digest.update(Path(source).read_bytes())
        digest.update(headers_digest(sources).encode())
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]


def load_extension(name: str, sources: list[str], **options):
    """``torch.utils.cpp_extension.load(name, sources, **options)`` inside :func:`exclusive_build` (a stale build
    lock is cleared first), with :func:`headers_digest` among the C++ flags; raises what ``load`` raises."""
    from torch.utils.cpp_extension import load

    options["extra_cflags"] = [*options.get("extra_cflags", []), f"-DINFERNEO_HEADERS_DIGEST={headers_digest(sources)}"]
    build_dir = extension_build_dir(name)
    with exclusive_build(build_dir):
        return load(name=name, sources=sources, build_directory=str(build_dir), **options)


@contextlib.contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold this machine's Inferneo build lock for ``build_dir`` (waiting while another live process holds it), and
    remove a ``lock`` file left in ``build_dir`` by a build that died."""
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    guard_path = build_dir.with_name(build_dir.name + ".inferneo-build.lock")  # beside: survives a cleaned folder
    with open(guard_path, "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building %s", build_dir.name)
            fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            clear_stale_lock(build_dir)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove PyTorch's ``lock`` file from ``build_dir``; call only while holding :func:`exclusive_build`'s lock
    (then no live Inferneo build owns the file). Returns whether there was one."""
    stale = build_dir / "lock"
    if not stale.exists():
        return False
    logger.warning("removing the stale build lock %s: a build of %s was killed before it finished (no live "
                   "process is building it); building again", stale, build_dir.name)
    stale.unlink(missing_ok=True)
    return True
