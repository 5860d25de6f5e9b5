"""Sentences per second of ``/v1/embeddings`` (a real ``inferneo serve`` over HTTP) against sentence-transformers'
``encode`` in this process, on the same model folder and the same batches, rounds interleaved so that both see the
same load on a shared machine. Prints one JSON line (appended to ``--out`` if given).

The model is built here: a Qwen3-architecture decoder of MiniLM's size (``--hidden-size 384 --layers 6``, random
weights, float32) with sentence-transformers files (``--pooling mean`` + Normalize), as Qwen3-Embedding ships.
Sentences are random words (a fixed seed), 8 to 40 words each. The server's vectors are checked against
sentence-transformers' (cosine) before timing; both sides get one untimed warm-up batch.

    python benchmarks/embeddings_cpu.py --batch-size 32 --batches 3 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import emit_json, host_info, loadavg  # noqa: E402

_TEXT = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more other its time "
         "only new some could these two may first then do any like my now over such our man me even most made "
         "after also did many before must through years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come since against "
         "go came right used take three")
WORDS = _TEXT.split(" ")


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(n))) for n in rng.integers(8, 41, count)]


def build_model(path: Path, hidden_size: int, layers: int, pooling: str) -> Path:
    from inferneo.testing.embedding_models import make_tiny_embedding_model

    heads = hidden_size // 64
    return make_tiny_embedding_model(path, pooling, "qwen3", hidden_size=hidden_size, num_layers=layers,
                                     num_heads=heads, num_kv_heads=max(1, heads // 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="batches per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from inferneo.testing.server import RemoteServer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    model = build_model(work / "model", args.hidden_size, args.layers, args.pooling)
    st = SentenceTransformer(str(model), device="cpu")
    batches = [sentences(args.batch_size, args.seed + i) for i in range(args.batches)]
    start_load = loadavg()
    with RemoteServer(model, "--served-model-name", "bench", "--num-threads", str(args.threads),
                      "--max-num-batched-tokens", "8192", "--max-num-seqs", "256", "--kv-cache-memory", "256MiB",
                      "--disable-access-log", "--max-prompts-per-request", "2048") as server, \
            httpx.Client(base_url=server.base_url, timeout=600) as client:

        def serve(batch: list[str]) -> np.ndarray:
            r = client.post("/v1/embeddings", json={"model": "bench", "input": batch, "encoding_format": "base64"})
            r.raise_for_status()
            data = r.json()["data"]
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])

        def encode(batch: list[str]) -> np.ndarray:
            return st.encode(batch, batch_size=args.batch_size, convert_to_numpy=True)

        served, ref = serve(batches[0]), encode(batches[0])  # warm-up, and the same vectors
        cosine = float((served * ref).sum(1).min() / 1.0)
        times = {"inferneo": [], "sentence_transformers": []}
        for _ in range(args.rounds):
            for name, fn in (("inferneo", serve), ("sentence_transformers", encode)):
                t0 = time.perf_counter()
                for batch in batches:
                    fn(batch)
                times[name].append(time.perf_counter() - t0)
    per_round = args.batches * args.batch_size
    rates = {name: per_round / float(np.median(t)) for name, t in times.items()}
    emit_json({
        "benchmark": "embeddings_cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": f"qwen3 hidden {args.hidden_size} x {args.layers} layers, {args.pooling} pooling + Normalize",
        "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds, "threads": args.threads,
        "tokens_per_round": int(sum(len(st.tokenizer(b)["input_ids"][i]) for b in batches for i in range(len(b)))),
        "min_cosine_vs_sentence_transformers": round(cosine, 7),
        "sentences_per_s": {k: round(v, 1) for k, v in rates.items()},
        "round_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio": round(rates["inferneo"] / rates["sentence_transformers"], 2),
        "versions": {"torch": torch.__version__,
                     "sentence_transformers": __import__("sentence_transformers").__version__},
        **host_info(), "loadavg_start": start_load, "loadavg_end": loadavg(),
    }, args.out)


if __name__ == "__main__":
    main()
