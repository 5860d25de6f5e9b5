"""Why the Gemma 2 classifier test failed on the GPU machine: transformers on CPU and CUDA, eager and SDPA, beside the engine on CPU and CUDA (eager, no Triton ops, one chunk), for Gemma 2, Gemma 3 and Llama. Run from the repo root on the device: the answer is in benchmarks/gpu/results/2026-12-07-gemma2-classifier-diag.log."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from test_decoder_classifier import LABELS, PROMPTS

from inferneo.testing import make_tiny_checkpoint


def hf(path, device, attn=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    kw = {"attn_implementation": attn} if attn else {}
    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kw).eval().to(device)
    t = AutoTokenizer.from_pretrained(path)
    rows = []
    for p in PROMPTS:
        ids = t(p, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            rows.append(m(ids).logits[0].cpu())
    return torch.stack(rows)

def ours(path, device, env):
    code = f"""
import torch, json
from inferneo import LLM
import sys; sys.path.insert(0, 'tests')
from test_decoder_classifier import PROMPTS
llm = LLM({str(path)!r}, dtype='float32', max_num_seqs=4, max_num_batched_tokens={env.pop('TOK', 16)}, max_model_len=128, device={device!r}, enforce_eager={env.pop('EAGER', 'False')})
print('JSON', json.dumps([o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))
    line = [x for x in r.stdout.splitlines() if x.startswith("JSON")]
    if not line:
        return r.stderr[-1500:]
    return torch.tensor(json.loads(line[0][5:]))

for arch in ["gemma2", "gemma3", "llama"]:
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()), arch, labels=LABELS)
    ref = torch.softmax(hf(path, "cpu"), -1)
    print(arch, "HF cuda - HF cpu", (torch.softmax(hf(path, "cuda"), -1) - ref).abs().max().item())
    for attn in ["eager", "sdpa"]:
        try:
            print(arch, f"HF cpu {attn} - HF cpu default", (torch.softmax(hf(path, "cpu", attn), -1) - ref).abs().max().item())
        except Exception as e:
            print(arch, attn, "error", e)
    cases = {"cpu": ("cpu", {}), "cuda": ("cuda", {}), "cuda eager": ("cuda", {"EAGER": "True"}),
             "cuda no triton ops": ("cuda", {"INFERNEO_TRITON_OPS": "0", "INFERNEO_TRITON_GEMV": "0"}),
             "cuda one chunk": ("cuda", {"TOK": "256"})}
    if arch != "gemma2":
        cases = {k: cases[k] for k in ("cpu", "cuda")}
    for name, (device, env) in cases.items():
        got = ours(path, device, dict(env))
        if isinstance(got, str):
            print(arch, name, "ERROR", got)
        else:
            print(arch, name, "- HF cpu:", (got - ref).abs().max().item())
