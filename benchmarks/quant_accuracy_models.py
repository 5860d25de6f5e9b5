#!/usr/bin/env python3
"""The checkpoints behind the perplexity table of docs/quantization.md ("Accuracy and speed"), written into ``--out``:

- ``default-fp32``: the bundled default model (its Q4_1 GGUF de-quantized) as a float32 HF folder;
- ``parity``: the trained parity model (``tests/data/parity-llama``) with a tokenizer;
- for each of the two, ``NAME-fp8`` (compressed-tensors FP8, per-channel weights, dynamic per-token activations)
  and ``NAME-awq`` (AWQ 4-bit, group 64, zero points; ``NAME-awq-deq`` its de-quantized float32 copy).

Then, e.g. (FP8 math emulated on CPU):

    INFERNEO_FP8_CPU_EMULATION=1 python benchmarks/quant_perplexity.py --model OUT/default-fp32 --texts 8 \\
        --tokens 256 --variants fp32,bf16,fp8-kv,fp8=OUT/default-fp8,awq-g64=OUT/default-awq
    INFERNEO_FP8_CPU_EMULATION=1 python benchmarks/quant_perplexity.py --model OUT/parity --pattern-texts \\
        --texts 16 --tokens 128 --variants fp32,bf16,fp8-kv,fp8=OUT/parity-fp8,awq-g64=OUT/parity-awq
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from parity_fixture import copy_parity_model  # noqa: E402

from inferneo.testing.int4_checkpoints import write_int4_checkpoint  # noqa: E402
from inferneo.testing.quantized_checkpoints import write_fp8_checkpoint  # noqa: E402
from inferneo.testing.weight_memory import write_default_model_copy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the checkpoints")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    default = write_default_model_copy(root / "default-fp32", torch.float32)
    parity = root / "parity"
    if not parity.exists():
        copy_parity_model(parity)
    for name, source in (("default", default), ("parity", parity)):
        write_fp8_checkpoint(source, root / f"{name}-fp8", "ct-channel-dynamic")
        write_int4_checkpoint(source, root / f"{name}-awq", root / f"{name}-awq-deq", "awq", group_size=64)
    print(f"checkpoints in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
