#!/usr/bin/env python3
"""Weights are held once on CUDA: the device memory building the default model's engine adds, less its KV cache and
the fixed cost of building any engine (a tiny checkpoint's build), within 1.15x the weight bytes.

The same accounting as ``tests/test_weight_memory.py`` on CPU (``inferneo/testing/weight_memory.py``), with the
CUDA caching allocator's reserved bytes in place of the resident set size; the host's resident memory is reported
beside it (on CUDA the weights pass through the host while loading, and should not stay there). Each build is a
fresh process with ``kv_cache_memory=64MiB``: float32 and bfloat16, eager and with decode CUDA graphs (captured
for ``max_num_seqs`` 256: their memory pool grows with the model's widths and is reported, not excused).

The default model's weights come from its bundled GGUF file when installed; otherwise a random checkpoint of the
same shapes (SmolLM2-135M; the MLP is 2 x hidden wide instead of 1536) is written. About 2 minutes on an H200:

    python3 benchmarks/gpu/weight_memory.py --out $OUT

Writes ``$OUT/weight_memory.json``; exits 1 when a configuration goes over the limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

import torch  # noqa: E402

from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from inferneo.testing.weight_memory import (  # noqa: E402
    DEFAULT_MODEL_SHAPES,
    measure_engine_memory,
    weight_excess,
    write_default_model_copy,
)

LIMIT = 1.15


def default_model_folder(root: Path, dtype: torch.dtype) -> Path:
    """The default model in ``dtype`` under ``root``: its real weights when its GGUF is installed, else random."""
    folder = root / str(dtype).removeprefix("torch.")
    try:
        return write_default_model_copy(folder, dtype)
    except FileNotFoundError as exc:
        print(f"default model not installed ({str(exc).splitlines()[0]}): random weights of its shapes", flush=True)
        return make_tiny_checkpoint(folder, "llama", torch_dtype=dtype, **DEFAULT_MODEL_SHAPES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="weight-memory-"))
    rows, failed = [], False
    on_device = args.device.startswith("cuda")  # --device cpu: the host figures (a check of this script)
    for dtype in (torch.float32, torch.bfloat16):
        folder = default_model_folder(root, dtype)
        # the fixed cost: a tiny model with the same vocabulary and tokenizer (the front end keeps vocabulary-sized
        # tables: about 128 MB of host memory at 49,152 ids with a tokenizer that knows fewer)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        tiny = make_tiny_checkpoint(root / f"tiny-{dtype}", "llama", vocab_size=vocab, tie_word_embeddings=True,
                                    torch_dtype=dtype)
        for eager in (True, False):
            options = dict(enforce_eager=eager)
            fixed = measure_engine_memory(tiny, device=args.device, tokenizer=str(folder), **options)
            measured = measure_engine_memory(folder, device=args.device, **options)
            device_ratio = weight_excess(measured, fixed, on_device=on_device)
            host_left = (measured.host_added - fixed.host_added) / measured.weight_bytes
            row = dict(dtype=str(dtype), eager=eager, device_ratio=round(device_ratio, 4),
                       host_added_beyond_fixed_per_weight_byte=round(host_left, 4),
                       measured=asdict(measured), fixed=asdict(fixed))
            rows.append(row)
            ok = device_ratio <= LIMIT
            failed |= not ok
            added, fixed_added = ((measured.device_added, fixed.device_added) if on_device
                                  else (measured.host_added, fixed.host_added))
            print(f"{dtype} {'eager' if eager else 'graphs'}: added {added / 2**20:.0f} MiB "
                  f"(KV {measured.kv_bytes / 2**20:.0f}, fixed {(fixed_added - fixed.kv_bytes) / 2**20:.0f}, "
                  f"weights {measured.weight_bytes / 2**20:.0f}) -> {device_ratio:.3f}x "
                  f"{'ok' if ok else f'OVER {LIMIT}x'}; host beyond the tiny build {host_left:.3f}x the weights",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_memory.json").write_text(json.dumps(dict(limit=LIMIT, rows=rows), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
