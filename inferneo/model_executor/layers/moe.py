"""Mixture-of-experts layer: stacked expert weights, a router, and a batched-PyTorch expert computation.

The experts of a layer live in two stacked tensors, ``w13`` ``[E, 2*I, H]`` (gate rows, then up rows, as one fused
gate/up projection per expert) and ``w2`` ``[E, H, I]`` (the down projections), with optional biases ``[E, 2*I]`` and
``[E, H]``. A router (``moe_routing.py``) picks ``top_k`` experts and their weights for every token;
:func:`fused_experts` computes ``sum_k weight[t, k] * expert_{ids[t, k]}(x[t])``. Device kernels replace the expert
computation of a :class:`FusedMoE` through its ``expert_kernel`` attribute (``device_kernels.py``), never the layer,
unless a weight format holds the experts in its own layout and set a kernel that reads it (``expert_kernel_fixed``:
GGUF's ggml blocks, ``quantization/gguf_experts.py``, whose kernel is :func:`fused_experts` with block projections).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.model_executor.layers.moe_routing import ROUTING_FUNCTIONS, Router, RouterOutput

ACTIVATIONS = ("silu", "swigluoai")
"""Gated expert activations: ``silu`` is ``SiLU(gate) * up``; ``swigluoai`` is gpt-oss's clamped variant."""
SWIGLU_OAI_LIMIT = 7.0
SWIGLU_OAI_ALPHA = 1.702


@dataclass(frozen=True, slots=True)
class MoeConfig:
    """The mixture-of-experts values of a decoder config.

    A layer is sparse when it is not in ``mlp_only_layers`` and ``(index + 1) % sparse_step == 0``; the others keep
    the dense MLP. ``shared_expert_intermediate_size`` 0 means no shared expert. ``routing`` names a key of
    :data:`~inferneo.model_executor.layers.moe_routing.ROUTING_FUNCTIONS`, ``activation`` one of
    :data:`ACTIVATIONS`; ``expert_bias`` adds biases to the expert projections, ``router_bias`` to the router linear.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    routing: str = "softmax_topk"
    shared_expert_intermediate_size: int = 0
    sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    activation: str = "silu"
    expert_bias: bool = False
    router_bias: bool = False

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_FUNCTIONS:
            raise ValueError(f"unknown mixture-of-experts routing {self.routing!r}; "
                             f"supported: {sorted(ROUTING_FUNCTIONS)}")
        _check_activation(self.activation)

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` holds experts (else a dense MLP)."""
        return layer_index not in self.mlp_only_layers and (layer_index + 1) % self.sparse_step == 0


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown mixture-of-experts activation {activation!r}; supported: {list(ACTIVATIONS)}")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert activation of ``gate_up`` ``[..., 2*I]`` (gate half first, then up half): ``[..., I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "swigluoai":
        gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
        up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return (up + 1) * gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate)
    _check_activation(activation)
    raise AssertionError(activation)


Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]
"""``project(x, weight, bias, out)``: one expert's projection ``out = x @ W.T (+ bias)`` written into ``out``
``[rows, out_features]`` (``x``'s dtype), where ``weight`` is the expert's slice of a stacked expert tensor
(``w13[e]`` or ``w2[e]``) and ``W`` the matrix it holds (itself, or what a format's blocks encode)."""


def dense_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """The :data:`Projection` of a full-width weight: ``out = x @ weight.T (+ bias)``."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  *, activation: str = "silu", w13_bias: torch.Tensor | None = None,
                  w2_bias: torch.Tensor | None = None, project_w13: Projection = dense_projection,
                  project_w2: Projection = dense_projection) -> torch.Tensor:
    """``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` for every token, in batched PyTorch.

    ``x`` is ``[T, H]``, ``w13`` ``[E, 2*I, H]``, ``w2`` ``[E, H, I]``, ``weights`` and ``ids`` ``[T, k]``;
    ``w13_bias`` ``[E, 2*I]`` and ``w2_bias`` ``[E, H]`` are optional (the down bias is scaled by the routing weight
    like the rest of the expert's output). Returns ``[T, H]`` in ``x``'s dtype.

    ``project_w13`` and ``project_w2`` run one expert's projection (:data:`Projection`); by default a matrix
    product with its full-width weight. A format that holds the experts otherwise passes its own (GGUF: ``w13``
    ``[E, 2*I, row_bytes]`` and ``w2`` ``[E, H, row_bytes]`` of ggml blocks and a block matmul): only the first two
    dimensions of ``w13`` and ``w2`` are read here.

    The (token, slot) pairs are sorted by expert and their rows of ``x`` gathered once; each expert that received
    pairs then runs one matrix product per projection, written in place into shared buffers, and the activation,
    the routing weights and the scatter back to tokens run once for all pairs. The Python loop is over the experts
    that received pairs (at most ``T * k``), never over tokens.
    """
    num_tokens, top_k = ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    if num_tokens == 1:
        return _one_token_experts(x, w13, w2, weights, ids, activation, w13_bias, w2_bias, project_w13, project_w2)
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // top_k
    spans = []  # (expert, first pair, end) in sorted order
    start = 0
    for expert, count in enumerate(torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()):
        if count:
            spans.append((expert, start, start + count))
            start += count
    rows = x[token_of]
    gate_up = x.new_empty(rows.shape[0], w13.shape[1])
    for expert, first, end in spans:
        project_w13(rows[first:end], w13[expert], None if w13_bias is None else w13_bias[expert],
                    gate_up[first:end])
    hidden = gated_activation(gate_up, activation)
    per_pair = x.new_empty(rows.shape[0], w2.shape[1])
    for expert, first, end in spans:
        project_w2(hidden[first:end], w2[expert], None if w2_bias is None else w2_bias[expert],
                   per_pair[first:end])
    per_pair.mul_(weights.reshape(-1)[order].to(x.dtype)[:, None])
    return torch.zeros_like(x).index_add_(0, token_of, per_pair)


def _one_token_experts(x, w13, w2, weights, ids, activation, w13_bias, w2_bias, project_w13,
                       project_w2) -> torch.Tensor:
    """:func:`fused_experts` for one token (a batch-1 decode step): its ``k`` experts one after the other, no
    grouping."""
    gate_up = x.new_empty(ids.shape[1], w13.shape[1])
    experts = ids[0].tolist()
    for slot, expert in enumerate(experts):
        project_w13(x, w13[expert], None if w13_bias is None else w13_bias[expert], gate_up[slot : slot + 1])
    hidden = gated_activation(gate_up, activation)
    per_slot = x.new_empty(ids.shape[1], w2.shape[1])
    for slot, expert in enumerate(experts):
        project_w2(hidden[slot : slot + 1], w2[expert], None if w2_bias is None else w2_bias[expert],
                   per_slot[slot : slot + 1])
    return torch.mm(weights.to(x.dtype), per_slot)


ExpertKernel = Callable[..., torch.Tensor]
"""A function with :func:`fused_experts`' signature (device kernels provide their own)."""


class FusedMoE(nn.Module):
    """A router linear (``gate``), a :data:`~inferneo.model_executor.layers.moe_routing.Router` and ``num_experts``
    gated experts as stacked weights.

    ``bias`` adds ``experts.gate_up_proj_bias`` ``[E, 2*I]`` and ``experts.down_proj_bias`` ``[E, H]``;
    ``router_bias`` a bias on ``gate``. ``shared_expert`` (an MLP module) and ``shared_expert_gate`` (a linear to one
    logit) add Qwen2-MoE's shared expert: its output, scaled by the sigmoid of the gate, is added to the routed
    experts' sum. ``expert_kernel`` computes the routed experts (:func:`fused_experts` unless a device kernel
    replaced it). ``all_reduce``, set by tensor parallelism, sums the ranks' partial outputs of the whole block.

    A weight format may replace ``experts`` with a module holding ``gate_up_proj`` / ``down_proj`` in its own
    layout (GGUF's ggml blocks: ``quantization/gguf_experts.py``) and set ``expert_kernel`` to a kernel that reads
    them; it then sets ``expert_kernel_fixed``, and device kernels leave that layer's ``expert_kernel`` alone.
    """

    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    expert_kernel_fixed: bool = False

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, router: Router, *,
                 activation: str = "silu", bias: bool = False, router_bias: bool = False,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}); got {top_k}")
        _check_activation(activation)
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.router = router
        self.expert_kernel: ExpertKernel = fused_experts
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)
        self.gate.quantizable = False  # routers stay in the model dtype under every quantization format
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.experts.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.experts.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.experts.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        if self.shared_expert_gate is not None:
            self.shared_expert_gate.quantizable = False

    def routed_experts(self, x: torch.Tensor, routed: RouterOutput | None = None) -> torch.Tensor:
        """The weighted sum of the routed experts' outputs for ``x`` ``[T, H]`` (no shared expert); ``routed``: the
        routing when the caller computed it already (a device kernel that fuses the router linear), else the
        router's of ``gate(x)``."""
        if routed is None:
            routed = self.router(self.gate(x))
        experts = self.experts
        return self.expert_kernel(x, experts.gate_up_proj, experts.down_proj, routed.weights, routed.ids,
                                  activation=self.activation, w13_bias=getattr(experts, "gate_up_proj_bias", None),
                                  w2_bias=getattr(experts, "down_proj_bias", None))

    def forward(self, x: torch.Tensor, routed: RouterOutput | None = None) -> torch.Tensor:
        out = self.routed_experts(x, routed)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out if self.all_reduce is None else self.all_reduce(out)
