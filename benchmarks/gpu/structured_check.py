#!/usr/bin/env python3
"""Structured output on CUDA: every constrained answer valid, and the same tokens whatever the scheduling.

The schema suite of the tests (``inferneo.testing.schema_suite``: 35 JSON schemas, 12 regexes) on a small random
Llama, greedy, float32, three ways: on CUDA with the defaults there (asynchronous scheduling, decode CUDA
graphs), on CUDA with synchronous scheduling, and on the CPU. Every JSON answer must parse strictly and validate
with ``jsonschema``, every regex answer must ``re.fullmatch``; the token ids of the CUDA runs must be equal, and
are compared with the CPU's (float32 on both; reported, a mismatch there is a numerics question, not a grammar
one). Unconstrained requests ride in the same batch and must come out as they do alone.

Writes ``structured_check.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jsonschema  # noqa: E402
import torch  # noqa: E402

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.testing import make_tiny_checkpoint  # noqa: E402
from inferneo.testing.schema_suite import REGEXES, SCHEMAS  # noqa: E402


def run(model: Path, device: str, async_scheduling: bool | None, prompts, params) -> list[list[int]]:
    llm = LLM(str(model), device=device, dtype="float32", async_scheduling=async_scheduling, max_model_len=1024)
    outs = llm.generate(prompts, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    ids = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ids, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda", help="the device under test (cpu checks the script)")
    args = ap.parse_args()
    dev = args.device
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", hidden_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2)
    prompts, params, kinds = [], [], []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        prompts.append(f"Record {i}: {name}")
        params.append(SamplingParams(temperature=0, max_tokens=400, structured_outputs={"json": schema}))
        kinds.append(("json", name))
    for i, (name, pattern) in enumerate(REGEXES.items()):
        prompts.append(f"Pattern {i}: {name}")
        params.append(SamplingParams(temperature=0, max_tokens=200, structured_outputs={"regex": pattern}))
        kinds.append(("regex", name))
    for i in range(16):  # unconstrained neighbours
        prompts.append(f"Free text {i}")
        params.append(SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
        kinds.append(("free", str(i)))
    free = [i for i, k in enumerate(kinds) if k[0] == "free"]

    runs = {}
    for label, device, mode in (("cuda_default", dev, None), ("cuda_sync", dev, False), ("cpu", "cpu", None)):
        runs[label] = run(model, device, mode, prompts, params)
    alone_ids, _ = run(model, dev, None, [prompts[i] for i in free], [params[i] for i in free])

    ids, texts = runs["cuda_default"]
    invalid = []
    for (kind, name), text in zip(kinds, texts, strict=True):
        try:
            if kind == "json":
                jsonschema.validate(json.loads(text), SCHEMAS[name])
            elif kind == "regex" and not re.fullmatch(REGEXES[name], text):
                raise ValueError("no full match")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            invalid.append({"kind": kind, "name": name, "text": text[:200], "error": str(exc)[:200]})
    result = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else dev, "torch": torch.__version__,
        "constrained": len(prompts) - len(free), "unconstrained": len(free),
        "invalid_on_cuda": invalid,
        "cuda_async_equals_sync": runs["cuda_default"][0] == runs["cuda_sync"][0],
        "cuda_equals_cpu_requests": sum(a == b for a, b in zip(ids, runs["cpu"][0], strict=True)),
        "unconstrained_equal_alone": [ids[i] for i in free] == alone_ids,
    }
    result["ok"] = (not invalid and result["cuda_async_equals_sync"] and result["unconstrained_equal_alone"])
    print(json.dumps(result, indent=1))
    (out_dir / "structured_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
