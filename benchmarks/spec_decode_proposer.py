"""Host time of one prompt-lookup proposal (``NgramProposer.propose``) per request and step, at growing contexts:
reading the token list afresh each step against a ``TokenHistory`` that copies only the appended tokens.

Each case appends one random token and proposes, 200 times, after one untimed call; random tokens (vocabulary
32,000, a fixed seed), so lookups seldom match and the search runs its full length.

    python benchmarks/spec_decode_proposer.py
"""

from __future__ import annotations

import random
import time

from inferneo.spec_decode.config import SpeculativeConfig
from inferneo.spec_decode.ngram import NgramProposer, TokenHistory


def main() -> None:
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=4))
    rng = random.Random(0)
    for length in (256, 2048, 8192, 32768):
        tokens = [rng.randrange(32000) for _ in range(length)]
        history = TokenHistory()
        proposer.propose(tokens, history=history)
        micros = {}
        for name, extra in (("list", {}), ("history", {"history": history})):
            start = time.perf_counter()
            for _ in range(200):
                tokens.append(rng.randrange(32000))
                proposer.propose(tokens, **extra)
            micros[name] = round((time.perf_counter() - start) / 200 * 1e6, 1)
        print(f"{length:6d} tokens: list {micros['list']:6.1f} us, history {micros['history']:5.1f} us", flush=True)


if __name__ == "__main__":
    main()
