"""What a step verifying draft tokens costs beside a plain decode step, now that such steps run as decode rows and
replay CUDA graphs (``step_inputs``: a request with ``k`` drafts is ``k + 1`` decode rows).

One engine with ``speculative_config`` (Llama-2-7B architecture, dummy bf16 weights, on CUDA; ``--smoke``: the
trained parity model on CPU). A benchmark proposer (not the n-gram one) decides each step's drafts, and the
keep-rate limit is lifted, so every request checks exactly ``k`` drafts in the timed steps:

1. **Step times** at batch 1 and 8, context ~1,040: a plain decode step (no drafts) and a step with ``k`` drafts a
   request (2, 4, 8), with the decode graphs on and, for the draft steps, off (eager: how they ran before). The
   ratio gives the speedup a keep rate buys: ``(1 + kept drafts a step) / (draft step / plain step)``.
2. **End to end** at batch 1: greedy outputs of a plain run, then the same prompts with drafts that are those
   outputs (an oracle): tokens per second of both, the share of drafts kept (bf16 steps of 1 and of ``k + 1``
   rows round differently, so an oracle draft is not always the engine's token), and whether the tokens equal
   the plain run's.

    python benchmarks/gpu/spec_decode_graphs.py --out $OUT/spec_graphs.jsonl
    python benchmarks/gpu/spec_decode_graphs.py --smoke            # CPU dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
from offline_throughput import emit_json as emit  # noqa: E402


class BenchmarkProposer:
    """Drafts chosen by the benchmark: ``k`` fixed tokens (``mode="fixed"``), the known continuation of the
    prompt (``"oracle"``), or none (``"off"``)."""

    def __init__(self) -> None:
        self.mode, self.k, self.continuations = "off", 0, {}

    def propose(self, token_ids: list[int], max_drafts: int | None = None, history=None) -> list[int]:
        k = min(self.k, max_drafts if max_drafts is not None else self.k)
        if self.mode == "fixed":
            return [token_ids[-1]] * k
        if self.mode == "oracle":
            for prompt, continuation in self.continuations.items():
                if tuple(token_ids[: len(prompt)]) == prompt:
                    done = len(token_ids) - len(prompt)
                    return list(continuation[done : done + k])
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the parity model on CPU, a few steps")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--drafts", default="2,4,8")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from inferneo import LLM, SamplingParams
    from inferneo.model_executor.arch_presets import materialize_preset
    from inferneo.spec_decode.state import SpeculationState

    SpeculationState.draft_limit = lambda self, most: most  # every request checks the drafts it is given
    drafts = [int(k) for k in args.drafts.split(",")]
    if args.smoke:
        import tempfile

        from parity_fixture import copy_parity_model

        folder = copy_parity_model(Path(tempfile.mkdtemp()) / "parity-llama")
        folder, device, ctx, steps = str(folder), "cpu", 48, 4
        engine = dict(max_model_len=256, dtype="float32", max_num_seqs=8)
    else:
        folder = str(materialize_preset("llama-2-7b", Path(args.out or ".").parent / "models"))
        device, ctx, steps = "cuda", args.ctx, args.steps
        engine = dict(max_model_len=2048, dtype="bfloat16", load_format="dummy", max_num_seqs=8,
                      gpu_memory_utilization=0.5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    label = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    llm = LLM(folder, device=device, speculative_config={"num_speculative_tokens": max(drafts)}, **engine)
    eng, runner = llm.engine, llm.engine.runner
    proposer = eng.core.proposer = BenchmarkProposer()
    vocab = eng.vocab_size
    rng = np.random.default_rng(0)
    print(f"{label}: graphs {runner.graphs is not None}, buckets {runner.decode_buckets[:6]}..."
          f"{runner.decode_buckets[-1:]}", flush=True)

    def timed_steps(batch: int, mode: str, k: int, graphs: bool) -> float:
        """Mean step time over ``steps`` steps of ``batch`` requests past their prompts."""
        proposer.mode, proposer.k = "off", k
        runner.use_cuda_graphs = graphs and runner.graphs is not None
        ids = [eng.add_request(f"t-{batch}-{mode}-{k}-{i}-{time.monotonic_ns()}",
                               rng.integers(100, vocab - 100, size=ctx - 1).tolist(),
                               SamplingParams(temperature=0, max_tokens=(steps + 4) * (k + 1), ignore_eos=True))
               for i in range(batch)]
        sched = eng.scheduler
        try:
            while len(sched.waiting) or any(r.num_output_tokens == 0 for r in sched.running):
                eng.step()
            proposer.mode = mode
            eng.step()
            eng.step()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                eng.step()
            sync()
            return (time.perf_counter() - start) / steps * 1e3
        finally:
            for request_id in ids:
                eng.abort_request(request_id)
            runner.use_cuda_graphs = runner.graphs is not None

    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:  # warm-up: every shape the timed steps take, once
        timed_steps(batch, "off", 0, True)
        for k in drafts:
            timed_steps(batch, "fixed", k, True)
    for batch in batches:  # medians of three rounds, the kinds of step alternating
        times: dict[str, list[float]] = {}
        for _ in range(3):
            times.setdefault("plain_graph", []).append(timed_steps(batch, "off", 0, True))
            for k in drafts:
                times.setdefault(f"drafts{k}_graph", []).append(timed_steps(batch, "fixed", k, True))
                if runner.graphs is not None:
                    times.setdefault(f"drafts{k}_eager", []).append(timed_steps(batch, "fixed", k, False))
        row = {"part": "step_ms", "device": label, "batch": batch, "context": ctx,
               **{name: round(float(np.median(values)), 3) for name, values in times.items()}}
        plain = row["plain_graph"]
        for k in drafts:
            row[f"drafts{k}_ratio"] = round(row[f"drafts{k}_graph"] / plain, 3)
            row[f"drafts{k}_speedup_if_all_kept"] = round((k + 1) / row[f"drafts{k}_ratio"], 2)
        emit(row, args.out)

    # End to end at batch 1: plain greedy outputs, then the same prompts with those outputs as drafts.
    k = 4
    prompts = [rng.integers(100, vocab - 100, size=int(n)).tolist() for n in rng.integers(ctx // 2, ctx, size=4)]
    greedy = SamplingParams(temperature=0, max_tokens=8 * steps, ignore_eos=True)
    results = {}
    proposer.mode = "off"
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for mode in ("off", "oracle"):
        proposer.mode, proposer.k = mode, k
        drafted, kept = eng.core.stats.num_draft_tokens, eng.core.stats.num_accepted_tokens
        sync()
        start = time.perf_counter()
        outputs = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        sync()
        seconds = time.perf_counter() - start
        results[mode] = dict(tok_s=sum(map(len, outputs)) / seconds, outputs=outputs,
                             drafts=eng.core.stats.num_draft_tokens - drafted,
                             kept=eng.core.stats.num_accepted_tokens - kept)
        if mode == "off":
            proposer.continuations = {tuple(p): list(o) for p, o in zip(prompts, outputs, strict=True)}
    same = sum(a == b for a, b in zip(results["off"]["outputs"], results["oracle"]["outputs"], strict=True))
    emit({"part": "end_to_end_b1", "device": label, "drafts": k, "plain_tok_s": round(results["off"]["tok_s"], 1),
          "oracle_tok_s": round(results["oracle"]["tok_s"], 1),
          "speedup": round(results["oracle"]["tok_s"] / results["off"]["tok_s"], 3),
          "kept_share": round(results["oracle"]["kept"] / max(results["oracle"]["drafts"], 1), 3),
          "identical_outputs": f"{same}/{len(prompts)}", "torch": torch.__version__}, args.out)


if __name__ == "__main__":
    main()
