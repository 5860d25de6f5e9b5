# Sourced by the device run scripts (merged_check_run.sh, w4a16_h2_run.sh) at their start: $OUT required,
# unbuffered Python, the wheels of benchmarks/gpu/README.md installed (the call carries scratch/quant/whl), then
# the card, the versions and the tree named in the output.
set -u
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  scratch/quant/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
git log -1 --format='tree of commit %h' 2>/dev/null || true
