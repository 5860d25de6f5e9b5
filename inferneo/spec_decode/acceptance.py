"""Which of a verified step's tokens a request keeps.

A request with drafts ``d_1..d_m`` runs ``m + 1`` positions in one step, and the sampler draws one token per
position (``s_0..s_m``), position ``j`` seeing the request's tokens followed by ``d_1..d_j``. The request keeps
``s_0``; it keeps ``s_j`` (for ``j >= 1``) only while every earlier draft was confirmed (``s_{i-1} == d_i`` for
all ``i <= j``).

Under greedy sampling this is plain decoding, token for token. Under random sampling it is exact too: n-gram
drafts are deterministic (a one-hot draft distribution), and for such a draft speculative sampling's rule --
accept ``d`` with probability ``p(d)``, else draw from ``p`` with ``d`` removed and renormalised -- is exactly
"draw ``s ~ p`` and keep the draft if ``s == d``, else keep ``s``". So each kept token has the distribution that
decoding one token at a time would give it.
"""

from __future__ import annotations


def accepted_prefix(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a request keeps from a step that verified ``drafts`` (``len(sampled) == len(drafts) + 1``):
    the confirmed drafts and then the model's own token at the first disagreement (or after the last draft)."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"a step verifying {len(drafts)} drafts samples {len(drafts) + 1} tokens, "
                         f"got {len(sampled)}")
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return sampled[: j + 1]
    return list(sampled)
