"""Wall time of an lm-evaluation-harness loglikelihood run against an OpenAI-compatible server (issue 22).

By default it starts ``inferneo serve`` on the bundled default model (SmolLM2-135M-Instruct, GGUF), writes a local
multiple-choice task (deterministic sentences, ``--docs`` documents of ``--choices`` answers each: that many
loglikelihood requests times the choices, no download), saves the model's tokenizer as a folder for lm-eval,
and times ``lm_eval --model local-completions`` (unmodified) from its start to its exit. ``--repeats`` runs it
again on the same server (the first run pays lm-eval's own start-up as every run does; the server is warm).

``--base-url URL --served-model NAME`` times the same run against a server started separately (vLLM's
``vllm serve`` on the same model, for instance), so both engines answer the same lm-eval command on the same
machine; ``--tokenizer`` must then name the tokenizer folder that server uses.

    python benchmarks/lm_eval_loglikelihood.py --docs 64 --choices 4 --batch-size 8 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import emit_json, host_info  # noqa: E402

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "city", "river", "house", "old",
         "king", "saw", "bright", "green", "field", "under", "morning", "light", "with", "many", "small", "birds")


def make_docs(num_docs: int, num_choices: int, seed: int = 0) -> list[dict]:
    """Deterministic multiple-choice documents: a question of 12-40 words and answers of 2-8 words."""
    rng = np.random.default_rng(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    return [{"question": sentence(12, 40), "choices": [" " + sentence(2, 8) for _ in range(num_choices)],
             "answer": int(rng.integers(0, num_choices))} for _ in range(num_docs)]


def write_task(folder: Path, docs: list[dict]) -> str:
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\noutput_type: multiple_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\ntest_split: test\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_target: answer\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    return "bench_mc"


def save_default_tokenizer(folder: Path) -> str:
    """The default model's tokenizer (read from its GGUF as the server reads it) saved as an HF folder."""
    from inferneo.model_loader import load_tokenizer, resolve_model

    load_tokenizer(resolve_model(None)).save_pretrained(folder)
    return str(folder)


def run_lm_eval(base_url: str, model: str, tokenizer: str, task: str, include: Path, out: Path, batch_size: int,
                num_concurrent: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={model},base_url={base_url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
           f"num_concurrent={num_concurrent},max_retries=1,tokenized_requests=True",
           "--tasks", task, "--include_path", str(include), "--batch_size", str(batch_size),
           "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"lm_eval failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    results = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())["results"][task]
    return wall, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request (lm-eval's --batch_size)")
    parser.add_argument("--num-concurrent", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base-url", help="time a server already running here instead of starting inferneo")
    parser.add_argument("--served-model", default="smollm2")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's, saved here)")
    parser.add_argument("--serve-args", default="--num-threads 2", help="extra inferneo serve arguments")
    parser.add_argument("--out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lm-eval-bench-") as tmp_name:
        tmp = Path(tmp_name)
        task = write_task(tmp, make_docs(args.docs, args.choices))
        tokenizer = args.tokenizer or save_default_tokenizer(tmp / "tokenizer")
        server = None
        base_url = args.base_url
        if base_url is None:
            from inferneo.model_loader import resolve_model
            from inferneo.testing.server import RemoteServer

            started = time.perf_counter()
            server = RemoteServer(resolve_model(None).path, "--served-model-name", args.served_model,
                                  "--disable-access-log", *args.serve_args.split(), startup_timeout=600)
            base_url = server.base_url
            print(f"inferneo serve ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        try:
            for repeat in range(args.repeats):
                wall, results = run_lm_eval(base_url, args.served_model, tokenizer, task, tmp, tmp / f"out{repeat}",
                                            args.batch_size, args.num_concurrent)
                requests = args.docs * args.choices
                emit_json({"bench": "lm_eval_loglikelihood", "engine": "inferneo" if server else base_url,
                           "repeat": repeat, "docs": args.docs, "choices": args.choices, "requests": requests,
                           "batch_size": args.batch_size, "num_concurrent": args.num_concurrent,
                           "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 2),
                           "acc": results.get("acc,none"), "loadavg": os.getloadavg()[0], **host_info()}, args.out)
        finally:
            if server is not None:
                server.close()


if __name__ == "__main__":
    main()
