"""The native-extension build lock: a build killed halfway does not block later starts; a live one is waited for."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from inferneo.kernels.cpu import cpu_extension_name, load_cpu_kernels
from inferneo.kernels.native_build import exclusive_build, extension_build_dir, extension_name

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the build lock is flock(2)")

# A stand-in for one build: take the lock as load_extension does, create PyTorch's lock file as
# torch.utils.cpp_extension does, say so, then hold both for SECONDS (or until killed).
BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from inferneo.kernels.native_build import exclusive_build
    build_dir, seconds = Path(sys.argv[1]), float(sys.argv[2])
    with exclusive_build(build_dir):
        lock = build_dir / "lock"
        lock.touch()
        print("building", flush=True)
        time.sleep(seconds)
        lock.unlink()
""")


def start_builder(build_dir: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(build_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "building"
    return proc


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path, caplog):
    build_dir = tmp_path / "inferneo_cpu_kernels"
    builder = start_builder(build_dir, 600)
    builder.send_signal(signal.SIGKILL)  # killed while compiling: PyTorch's lock file stays behind
    builder.wait()
    assert (build_dir / "lock").exists()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), exclusive_build(build_dir):
        assert not (build_dir / "lock").exists()
    assert time.monotonic() - start < 5
    assert "removing the stale build lock" in caplog.text and "inferneo_cpu_kernels" in caplog.text


def test_a_live_build_is_waited_for_and_its_lock_kept(tmp_path, caplog):
    build_dir = tmp_path / "inferneo_cpu_kernels"
    builder = start_builder(build_dir, 1.5)
    start = time.monotonic()
    with caplog.at_level(logging.INFO), exclusive_build(build_dir):
        waited = time.monotonic() - start
        assert builder.wait(timeout=5) == 0  # it finished its build and removed its own lock
    assert waited >= 1.0
    assert "waiting for another process" in caplog.text and "stale" not in caplog.text


def test_loading_the_kernels_after_a_killed_build_does_not_hang(tmp_path):
    """The real loader, in a fresh process, with a stale lock in the extension's build folder (as a start killed
    while compiling leaves it): it clears the lock and loads (or reports the build failing), never waits.

    The folder is a private copy of the real one (``TORCH_EXTENSIONS_DIR``): another test process loading the
    kernels at the same moment would otherwise clear the lock first (a test of ``-n 2`` once failed so)."""
    name = cpu_extension_name()
    load_cpu_kernels()  # built once on this machine (in the real folder) if it is not yet
    root = tmp_path / "torch_extensions"
    shutil.copytree(extension_build_dir(name), root / name, ignore=shutil.ignore_patterns("lock"))
    (root / name / "lock").touch()
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from inferneo.kernels.cpu import load_cpu_kernels\nprint('loaded', load_cpu_kernels() is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TORCH_EXTENSIONS_DIR": str(root)})
    assert not (root / name / "lock").exists()
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout and "removing the stale build lock" in done.stderr


def test_each_install_builds_in_a_folder_of_its_own(tmp_path):
    """Two checkouts' sources get two extension names (PyTorch would rebuild one folder in turn for them); the same
    sources, named by any path to them, get one."""
    first, second = tmp_path / "a" / "k.cpp", tmp_path / "b" / "k.cpp"
    for source in (first, second):
        source.parent.mkdir()
        source.write_text("int x;")
    assert extension_name("ext", [str(first)]) != extension_name("ext", [str(second)])
    again = tmp_path / "a" / ".." / "a" / "k.cpp"
    assert extension_name("ext", [str(again)]) == extension_name("ext", [str(first)])
    assert extension_name("ext", [str(first)]).startswith("ext_")
