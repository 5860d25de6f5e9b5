"""Environment variables Inferneo reads, in one typed place."""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def cpu_onednn_linear() -> bool:
    """INFERNEO_CPU_ONEDNN (default on): run CPU linear layers through prepacked oneDNN matmuls."""
    return _flag("INFERNEO_CPU_ONEDNN", True)


def cpu_native_kernels() -> bool:
    """INFERNEO_CPU_KERNELS (default on): build and use the C++ paged-attention kernel on CPU."""
    return _flag("INFERNEO_CPU_KERNELS", True)


def api_process_nice() -> int:
    """INFERNEO_API_NICE (default 10): how much the server's front-end process lowers its own CPU priority once
    the engine core runs in its own process on the CPU, so that HTTP work waits for the engine's compute threads
    rather than stalling them (0 keeps the priority)."""
    value = os.environ.get("INFERNEO_API_NICE", "").strip()
    return int(value) if value else 10


def test_fault() -> str:
    """INFERNEO_TEST_FAULT (tests only; unset in use): make the engine core's model steps raise, to test fault
    handling in the engine process. ``prompt:7,7,7,7`` fails every step that holds a request whose prompt starts
    with those token ids; ``always`` fails every step."""
    return os.environ.get("INFERNEO_TEST_FAULT", "").strip()
