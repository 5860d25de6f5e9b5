"""A plain per-token, per-expert mixture-of-experts reference for the expert-computation tests."""

from __future__ import annotations

import torch


def reference_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated activation written out from its definition (independent of ``layers/moe.py``)."""
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    assert activation == "swigluoai"
    gate = torch.minimum(gate, torch.full_like(gate, 7.0))
    up = torch.maximum(torch.minimum(up, torch.full_like(up, 7.0)), torch.full_like(up, -7.0))
    return (up + 1) * gate * torch.sigmoid(1.702 * gate)


def reference_experts(x, w13, w2, weights, ids, activation="silu", w13_bias=None, w2_bias=None):
    """``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])``, one token and one slot at a time."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = w13[e] @ x[t]
            if w13_bias is not None:
                gate_up = gate_up + w13_bias[e]
            y = w2[e] @ reference_activation(gate_up[:inter], gate_up[inter:], activation)
            if w2_bias is not None:
                y = y + w2_bias[e]
            out[t] += weights[t, k].to(x.dtype) * y
    return out
