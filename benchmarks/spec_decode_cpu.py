"""Speculative decoding by prompt lookup on CPU: output tokens per second with and without drafts, on the default
model (or ``--model``), for requests that copy from their prompt and for requests that do not.

Two engines live in this process, one with ``speculative_config`` and one without; rounds alternate between them
so both see the same load on a shared machine. Each workload runs at batch 1 (requests one after another) and as
one batch of all its requests. Greedy outputs of the two engines are compared token for token before timing: in
float32 they are equal; in bfloat16 a step that verifies several positions rounds differently from one that decodes
one, so near-ties may go the other way (the share of tokens before the first difference is recorded). Prints one JSON line per (workload, batch) (appended to ``--out`` if given) with both engines'
tokens per second, their ratio, and the drafts' acceptance.

Workloads (chat template, greedy, ``--max-tokens`` each):
- ``rewrite``: "repeat this passage" and "rename this variable in the code" requests, whose answers copy long
  stretches of the prompt (where prompt lookup helps: editing, extraction, retrieval-augmented answers);
- ``open``: open questions whose answers share little with the prompt (where drafts are rarely right: the cost).

    python benchmarks/spec_decode_cpu.py --rounds 3 --num-speculative-tokens 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import emit_json, host_info, loadavg  # noqa: E402

PASSAGES = [
    "The river rises in the northern hills, where snow lies until late spring. It runs south through pine forest "
    "and then across a wide plain of wheat fields, passing three market towns before it reaches the sea. Each "
    "town has a stone bridge, and the oldest of them was built more than six hundred years ago.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. When the front light "
    "turns green, open a browser and go to the address printed on the label. Sign in with the password on the "
    "same label, then choose a new network name and a new password.",
    "Our team meets every Monday at nine to plan the week. On Wednesday afternoon we review open issues, and on "
    "Friday each person writes a short note on what they finished, what is still open and what blocked them. "
    "Notes go into the shared folder so that anyone can read them.",
    "The library opens at eight in the morning on weekdays and at ten on weekends. Books may be borrowed for three "
    "weeks and renewed twice online. Late returns cost ten cents a day, and lost books are charged at their "
    "replacement price plus a small handling fee.",
]
CODE = '''def total_price(items, tax):
    x = 0
    for item in items:
        x = x + item.price * item.quantity
    x = x + x * tax
    return round(x, 2)
'''
OPEN = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me three ideas for a weekend trip in the mountains.",
    "What are the advantages of learning a second language?",
]


def workloads() -> dict[str, list[list[dict]]]:
    rewrite = [[{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{p}"}]
               for p in PASSAGES]
    rewrite += [[{"role": "user", "content": f"Rename the variable x to running_total in this function and "
                                             f"print the whole function:\n\n{CODE}"}]] * 2
    return {"rewrite": rewrite, "open": [[{"role": "user", "content": q}] for q in OPEN]}


def timed(llm, conversations, params, batch: bool) -> tuple[float, int, list[list[int]]]:
    """Seconds, output tokens and outputs of the conversations, all at once or one after another."""
    start = time.perf_counter()
    if batch:
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = [llm.chat(c, params, use_tqdm=False)[0] for c in conversations]
    seconds = time.perf_counter() - start
    ids = [o.outputs[0].token_ids for o in outputs]
    return seconds, sum(map(len, ids)), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled default model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--disable-by-batch-size", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import transformers

    import inferneo
    from inferneo import LLM, SamplingParams
    from inferneo.testing.agreement import greedy_agreement

    spec_config = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                   "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min,
                   "disable_by_batch_size": args.disable_by_batch_size}
    common = dict(dtype=args.dtype, num_threads=args.threads, kv_cache_memory="1GiB")
    engines = {"plain": LLM(args.model, **common), "spec": LLM(args.model, speculative_config=spec_config, **common)}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    info = host_info()
    info["loadavg_start"] = loadavg()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "inferneo": inferneo.__version__}
    for name, conversations in workloads().items():
        for batch in (False, True):
            # Untimed: the outputs must agree, and both engines warm up on this workload.
            outputs = {k: timed(llm, conversations, params, batch)[2] for k, llm in engines.items()}
            prefix, positional = greedy_agreement(outputs["spec"], outputs["plain"])
            seconds = {k: 0.0 for k in engines}
            tokens = {k: 0 for k in engines}
            core = engines["spec"].engine.core
            drafts0, accepted0, steps0 = (core.stats.num_draft_tokens, core.stats.num_accepted_tokens,
                                          core.stats.num_steps)
            plain_steps0 = engines["plain"].engine.core.stats.num_steps
            for _ in range(args.rounds):
                for key, llm in engines.items():
                    s, n, _ = timed(llm, conversations, params, batch)
                    seconds[key] += s
                    tokens[key] += n
            rate = {k: tokens[k] / seconds[k] for k in engines}
            drafts = core.stats.num_draft_tokens - drafts0
            accepted = core.stats.num_accepted_tokens - accepted0
            emit_json({
                "bench": "spec_decode_cpu", "workload": name, "batch": len(conversations) if batch else 1,
                "requests": len(conversations), "max_tokens": args.max_tokens, "rounds": args.rounds,
                "speculative_config": spec_config, "dtype": str(engines["plain"].engine.runner.dtype),
                "plain_tok_s": round(rate["plain"], 1), "spec_tok_s": round(rate["spec"], 1),
                "speedup": round(rate["spec"] / rate["plain"], 3),
                "mean_output_tokens": round(tokens["plain"] / args.rounds / len(conversations), 1),
                "draft_tokens": drafts, "accepted_tokens": accepted,
                "acceptance": round(accepted / drafts, 3) if drafts else None,
                "steps_plain": engines["plain"].engine.core.stats.num_steps - plain_steps0,
                "steps_spec": core.stats.num_steps - steps0,
                "identical_greedy_outputs": outputs["spec"] == outputs["plain"],
                "agreement_before_first_divergence": round(prefix, 4), **versions, **info, "loadavg_end": loadavg(),
            }, args.out)


if __name__ == "__main__":
    main()
