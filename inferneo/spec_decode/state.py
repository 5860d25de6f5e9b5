"""One request's speculation state: its tokens as the proposer reads them, and how many drafts are worth checking.

A draft costs a position in the step whether it is kept or not, and it is kept only if every draft before it was.
With ``p`` the chance that a request's draft is kept given that the ones before it were, the ``j``-th draft is kept
with chance ``p ** j``. A request is given at most as many drafts as keep that chance at 15% or more; ``p`` is
followed as a moving average over its verified steps (starting at 1: all drafts are tried at first). Below 15% for
even one draft, the request is given one draft every fourth step, so that ``p`` can recover when the text turns
repetitive. Measured on the CPU against always checking every draft (docs/benchmarks.md, "Speculative decoding on
CPU"): better in each case, most where drafts are seldom right (0.95x of plain decoding instead of 0.78x for open
questions at batch 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from inferneo.spec_decode.ngram import TokenHistory

KEEP_CHANCE_FLOOR = 0.15  # the least chance of being kept a draft must have to be checked
AVERAGE_WEIGHT = 0.3  # the weight of the latest step in the moving average of the keep rate
PROBE_EVERY = 4  # below the floor: one draft every this many steps


@dataclass(slots=True)
class SpeculationState:
    """What the engine keeps about one request's speculation between steps."""

    history: TokenHistory = field(default_factory=TokenHistory)
    keep_rate: float = 1.0  # moving average of the chance a draft is kept, given the ones before it were
    steps_below_floor: int = 0

    def draft_limit(self, most: int) -> int:
        """How many drafts to check this step, at most ``most``."""
        if most <= 0:
            return 0
        if self.keep_rate >= 1.0:
            return most
        if self.keep_rate <= KEEP_CHANCE_FLOOR:
            self.steps_below_floor += 1
            return 1 if self.steps_below_floor % PROBE_EVERY == 0 else 0
        worth = int(math.log(KEEP_CHANCE_FLOOR) / math.log(self.keep_rate))
        return max(1, min(most, worth))

    def record(self, num_drafts: int, num_kept: int) -> None:
        """A step checked ``num_drafts`` drafts and kept the first ``num_kept`` of them."""
        if num_drafts <= 0:
            return
        tried = min(num_kept + 1, num_drafts)  # drafts whose predecessors were all kept
        rate = num_kept / tried
        self.keep_rate = (1 - AVERAGE_WEIGHT) * self.keep_rate + AVERAGE_WEIGHT * rate
