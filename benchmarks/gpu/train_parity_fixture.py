#!/usr/bin/env python3
"""Train the small parity model (``parity_model.py``: a Llama that continues repeated patterns, wide greedy margins)
at the size the tests use on CPU, and save it as an HF folder: ``tests/data/parity-llama`` is this script's output
(trained once on a GPU in well under a minute; on 2 CPU cores it takes most of an hour).

    python3 benchmarks/gpu/train_parity_fixture.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import parity_model  # noqa: E402
import torch  # noqa: E402

SIZE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    start = time.perf_counter()
    model, loss = parity_model.build(args.device, steps=args.steps, batch=64, seq_len=128, lr=3e-3, target_loss=0.005,
                                     max_seconds=90, **SIZE)
    margins = parity_model.greedy_margins(model, parity_model.prompts(np.random.default_rng(1), 32, 96,
                                                                     SIZE["vocab_size"]))
    out = Path(args.out)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    info = {"loss": loss, "seconds": time.perf_counter() - start, "device": args.device,
            "min_margin": float(margins.min()), "median_margin": float(np.median(margins)),
            "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
