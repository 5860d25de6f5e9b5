"""Offline throughput: one batch of requests through ``LLM.generate`` in this process, generation timed alone.

With ``ignore_eos`` (the default for random prompts) each request asks for exactly its output length
(``max_tokens = min_tokens = n``), so every run of a workload produces the same number of tokens. Two small
warm-up requests run first; loading the model is not timed.
"""

from __future__ import annotations

import time
from typing import Any

from inferneo.bench.workload import Workload


def run_throughput(llm, workload: Workload, ignore_eos: bool = True, temperature: float = 0.0,
                   use_tqdm: bool = False) -> dict[str, Any]:
    """Generate for the workload with ``llm`` (an ``inferneo.LLM``); returns the figures."""
    from inferneo.sampling_params import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=temperature, max_tokens=n, min_tokens=n if ignore_eos else 0,
                              ignore_eos=ignore_eos)

    warmup = workload.prompts[:2]
    llm.generate(warmup, [params(min(4, n)) for n in workload.output_lens[:2]], use_tqdm=False)
    sampling = [params(n) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, sampling, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "num_requests": len(outputs), "elapsed_s": elapsed,
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "requests_per_s": len(outputs) / elapsed, "output_tok_per_s": output_tokens / elapsed,
        "total_tok_per_s": (prompt_tokens + output_tokens) / elapsed,
    }


def format_report(result: dict[str, Any]) -> str:
    """The figures as text."""
    c = result["config"]
    return "\n".join([
        f"offline throughput: {result['num_requests']} requests on {c['model'] or 'the default model'} "
        f"({c['dtype']})",
        f"  prompt / output tokens   {result['total_prompt_tokens']} / {result['total_output_tokens']}",
        f"  elapsed                  {result['elapsed_s']:.2f} s",
        f"  requests                 {result['requests_per_s']:.2f} req/s",
        f"  output tokens            {result['output_tok_per_s']:.1f} tok/s",
        f"  total tokens             {result['total_tok_per_s']:.1f} tok/s",
    ])
