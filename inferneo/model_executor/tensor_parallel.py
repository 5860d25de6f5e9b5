"""Tensor parallelism as a transform of a built model (Megatron-style sharding).

``shard_model`` swaps the layers of a Llama-family model for sharded ones:

- q/k/v and gate/up projections are split by output rows (column parallel): each rank computes its own heads and
  its slice of the MLP, with no communication;
- the attention output and MLP down projections are split by input columns (row parallel): each rank's partial
  product is summed over the ranks (one all-reduce each), then the bias is added once;
- mixture-of-experts blocks split every expert's intermediate dimension (gate/up rows, down columns; see
  :func:`shard_experts`); the router is replicated, a shared expert is split like the dense MLP, and the block's
  partial sums (routed experts plus shared expert) are all-reduced once;
- the embedding and the LM head are split by vocabulary rows: lookups outside a rank's rows give zeros and the
  all-reduce fills them in; the LM head's slices of the logits are gathered on the driver (rank 0), which samples.

Key/value heads are divided between ranks when there are at least as many as ranks; with fewer (grouped-query
attention on many ranks), each rank keeps the one kv head its query heads read, so heads are replicated.

Every sharded parameter carries a ``weight_loader(param, full_tensor, shard)``: it copies this rank's slice of a
full checkpoint tensor, so a rank never holds more than one full tensor at a time. Build the model on the
``meta`` device, shard it, then :func:`materialize` it on the real device before loading weights.

Once the weights are loaded, :func:`fuse_peer_norms` (part of the device transform, with peer memory only) makes
the row-parallel layers hand their partial sums to the RMSNorm after them, which all-reduces, adds the residual
and normalizes in one kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.distributed.parallel_state import TensorParallelGroup
from inferneo.distributed.peer_all_reduce import PartialSum
from inferneo.model_executor.layers.basic import RMSNorm
from inferneo.model_executor.layers.gpu_linear import DecodeGemv, linear
from inferneo.model_executor.layers.moe import FusedMoE
from inferneo.model_executor.layers.rotary import RotaryEmbedding
from inferneo.quantization.parallel import ParallelSlice


def _attach_loader(param: nn.Parameter, loader) -> None:
    param.weight_loader = loader


def _load_rows(param: nn.Parameter, full: torch.Tensor, shard: int | None = None, *, start: int) -> None:
    """Copy rows ``start .. start + len(param)`` of a full checkpoint tensor (a per-head vector's slice)."""
    src = full.narrow(0, start, param.shape[0])
    _check_shape(param.data, src, "per-head rows")
    param.data.copy_(src)


def _check_shape(dest: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint slice has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")


class QKVParallelLinear(nn.Linear):
    """The fused q/k/v projection holding this rank's query heads and its key/value heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TensorParallelGroup, device=None, dtype=None) -> None:
        if num_heads % tp.world_size:
            raise ValueError(f"{num_heads} attention heads cannot be split over {tp.world_size} ranks")
        if num_kv_heads % tp.world_size and tp.world_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} key/value heads cannot be split or replicated over {tp.world_size} ranks")
        self.head_dim = head_dim
        self.local_heads = num_heads // tp.world_size
        if num_kv_heads >= tp.world_size:
            self.local_kv_heads = num_kv_heads // tp.world_size
            self.kv_head_start = tp.rank * self.local_kv_heads
        else:  # replicate: ranks sharing a kv head are consecutive
            self.local_kv_heads = 1
            self.kv_head_start = tp.rank // (tp.world_size // num_kv_heads)
        self.q_head_start = tp.rank * self.local_heads
        out = (self.local_heads + 2 * self.local_kv_heads) * head_dim
        super().__init__(hidden, out, bias=bias, device=device, dtype=dtype)
        # The part of the full layer this rank holds (for a quantized format's layer in its place, LoRA).
        kv_start = self.kv_head_start * head_dim
        self.parallel_slice = ParallelSlice.column(
            (num_heads * head_dim, *(2 * (num_kv_heads * head_dim,))), (self.q_head_start * head_dim, kv_start,
                                                                        kv_start),
            (self.local_heads * head_dim, *(2 * (self.local_kv_heads * head_dim,))), hidden)
        _attach_loader(self.weight, self.load_shard)
        if bias:
            _attach_loader(self.bias, self.load_shard)

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int) -> None:
        """Copy this rank's heads of the full q (shard 0), k (1) or v (2) projection."""
        d, q_rows, kv_rows = self.head_dim, self.local_heads * self.head_dim, self.local_kv_heads * self.head_dim
        if shard == 0:
            src, dest_start, rows = full.narrow(0, self.q_head_start * d, q_rows), 0, q_rows
        else:
            src = full.narrow(0, self.kv_head_start * d, kv_rows)
            dest_start, rows = q_rows + (shard - 1) * kv_rows, kv_rows
        dest = param.data.narrow(0, dest_start, rows)
        _check_shape(dest, src, "qkv projection")
        dest.copy_(src)


class MergedColumnParallelLinear(nn.Linear):
    """Several projections fused by output rows (gate and up), each split evenly over the ranks."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool, tp: TensorParallelGroup,
                 device=None, dtype=None) -> None:
        for size in sizes:
            if size % tp.world_size:
                raise ValueError(f"output size {size} cannot be split over {tp.world_size} ranks")
        self.local_sizes = [size // tp.world_size for size in sizes]
        self.rank = tp.rank
        super().__init__(in_features, sum(self.local_sizes), bias=bias, device=device, dtype=dtype)
        # The part of the full layer this rank holds (for a quantized format's layer in its place, LoRA).
        self.parallel_slice = ParallelSlice.column(tuple(sizes), tuple(tp.rank * size for size in self.local_sizes),
                                                   tuple(self.local_sizes), in_features)
        _attach_loader(self.weight, self.load_shard)
        if bias:
            _attach_loader(self.bias, self.load_shard)

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int) -> None:
        size = self.local_sizes[shard]
        dest = param.data.narrow(0, sum(self.local_sizes[:shard]), size)
        src = full.narrow(0, self.rank * size, size)
        _check_shape(dest, src, "merged column-parallel projection")
        dest.copy_(src)


class RowParallelLinear(nn.Linear):
    """``y = sum over ranks of (x_rank @ W_rank.T) + b``: the input is split by columns, the output all-reduced."""

    packable = False  # the CPU oneDNN transform must leave this layer (and its all-reduce) in place
    # Set by ``fuse_peer_norms`` where an RMSNorm with a residual reads this layer's output: which peer staging
    # buffer (0 or 1, alternating along the model) its partial sum goes to for the fused all-reduce + norm.
    stage_index: int | None = None
    gemv: DecodeGemv | None = None  # one-row inputs through the Triton GEMV (set by ``use_decode_linears``)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup,
                 device=None, dtype=None) -> None:
        if in_features % tp.world_size:
            raise ValueError(f"input size {in_features} cannot be split over {tp.world_size} ranks")
        self.tp = tp
        super().__init__(in_features // tp.world_size, out_features, bias=bias, device=device, dtype=dtype)
        _attach_loader(self.weight, self.load_shard)
        if bias:
            _attach_loader(self.bias, self.load_replicated)
        # The part of the full layer this rank holds (for a quantized format's layer in its place, LoRA): its input
        # columns, its partial sum all-reduced (not by a partial row-parallel layer, whose block does it).
        self.parallel_slice = ParallelSlice.row(out_features, in_features, tp.rank, tp.world_size,
                                                reduces=type(self) is RowParallelLinear)

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int | None = None) -> None:
        cols = self.in_features
        src = full.narrow(1, self.tp.rank * cols, cols)
        _check_shape(param.data, src, "row-parallel projection")
        param.data.copy_(src)

    def load_replicated(self, param: nn.Parameter, full: torch.Tensor, shard: int | None = None) -> None:
        _check_shape(param.data, full, "row-parallel bias")
        param.data.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor | PartialSum:
        peer = self.tp.peer
        if (self.stage_index is not None and peer is not None and self.bias is None and x.dim() == 2
                and peer.fits_norm(x.shape[0], self.out_features, x.dtype)):
            staged = peer.stage(self.stage_index, x.shape[0], self.out_features, x.dtype)
            linear(x, self.weight, out=staged, gemv=self.gemv)
            return PartialSum(staged, self.stage_index, peer)  # the RMSNorm after this layer sums it
        out = self.tp.all_reduce(linear(x, self.weight, gemv=self.gemv))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows split over the ranks (the vocabulary padded to a multiple of the rank count)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallelGroup, device=None, dtype=None) -> None:
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.rows
        self.tp = tp
        super().__init__(self.rows, hidden, device=device, dtype=dtype)
        _attach_loader(self.weight, self.load_shard)

    def load_shard(self, param: nn.Parameter, full: torch.Tensor, shard: int | None = None) -> None:
        if full.shape[0] != self.vocab_size:
            raise ValueError(f"vocabulary rows: checkpoint has {full.shape[0]}, the config says {self.vocab_size}")
        end = min(self.start + self.rows, self.vocab_size)
        param.data.zero_()
        if end > self.start:
            param.data.narrow(0, 0, end - self.start).copy_(full.narrow(0, self.start, end - self.start))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Linear):
    """The LM head split by vocabulary rows; the driver receives the full logits, other ranks None."""

    packable = False
    gemv: DecodeGemv | None = None  # one-row inputs through the Triton GEMV (set by ``use_decode_linears``)

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, device=None, dtype=None) -> None:
        super().__init__(embedding.embedding_dim, embedding.rows, bias=False, device=device, dtype=dtype)
        self.vocab_size = embedding.vocab_size
        self.tp = embedding.tp
        if tied:
            self.weight = embedding.weight
        else:
            _attach_loader(self.weight, embedding.load_shard)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_to_driver(linear(hidden, self.weight, gemv=self.gemv), dim=-1)
        return None if logits is None else logits[..., : self.vocab_size]


class PartialRowParallelLinear(RowParallelLinear):
    """A row-parallel linear without bias whose output stays this rank's partial sum: the block it belongs to
    (a mixture-of-experts layer's shared expert) all-reduces once for all its parts."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, False, tp, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, gemv=self.gemv)


class ExpertShardLoader:
    """Copies this rank's slice of expert checkpoint tensors into the sharded stacked expert parameters.

    Each rank holds ``local = I / world_size`` of every expert's intermediate features: rows
    ``[rank * local, (rank + 1) * local)`` of the gate and of the up projection, the same columns of the down
    projection. Called as ``expert_loader(param, full, expert, block)``: ``expert`` None for a stacked checkpoint
    tensor (``[E, 2I, H]``, ``[E, H, I]``, biases ``[E, 2I]``), else one expert's projection (``block`` 0 gate, 1 up,
    None down). The down projection's bias is added once: rank 0 holds it, the others zeros.
    """

    def __init__(self, tp: TensorParallelGroup, local: int) -> None:
        self.rank, self.local, self.inter = tp.rank, local, local * tp.world_size

    def gate_up(self, param: nn.Parameter, full: torch.Tensor, expert: int | None, block: int | None) -> None:
        local = self.local
        if expert is None:  # stacked [E, 2I, H] or bias [E, 2I]: both halves
            for half in (0, 1):
                src = full.narrow(1, half * self.inter + self.rank * local, local)
                _check_shape(param.data.narrow(1, half * local, local), src, "expert gate/up projection")
                param.data.narrow(1, half * local, local).copy_(src)
            return
        src = full.narrow(0, self.rank * local, local)
        dest = param.data[expert].narrow(0, block * local, local)
        _check_shape(dest, src, "expert gate/up projection")
        dest.copy_(src)

    def down(self, param: nn.Parameter, full: torch.Tensor, expert: int | None, block: int | None = None) -> None:
        dest = param.data if expert is None else param.data[expert]
        src = full.narrow(full.dim() - 1, self.rank * self.local, self.local)
        _check_shape(dest, src, "expert down projection")
        dest.copy_(src)

    def down_bias(self, param: nn.Parameter, full: torch.Tensor, shard: int | None = None) -> None:
        _check_shape(param.data, full, "expert down-projection bias")
        if self.rank == 0:
            param.data.copy_(full)
        else:
            param.data.zero_()


def shard_experts(moe: FusedMoE, tp: TensorParallelGroup, device, dtype) -> None:
    """Shard a mixture-of-experts block in place: every expert keeps ``I / world_size`` intermediate features, a
    shared expert is split like the dense MLP (its down projection left as a partial sum) and the block all-reduces
    its output once. The router (``gate``) and the shared expert's gate stay replicated."""
    inter, world = moe.intermediate_size, tp.world_size
    if inter % world:
        raise ValueError(f"expert intermediate size {inter} cannot be split over {world} ranks "
                         f"(tensor_parallel_size must divide it)")
    local = inter // world
    experts = moe.experts
    num_experts, hidden = experts.down_proj.shape[0], experts.down_proj.shape[1]
    loader = ExpertShardLoader(tp, local)

    def new(*shape: int, **attrs) -> nn.Parameter:
        param = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)
        for key, value in attrs.items():
            setattr(param, key, value)
        return param

    experts.gate_up_proj = new(num_experts, 2 * local, hidden, expert_loader=loader.gate_up)
    experts.down_proj = new(num_experts, hidden, local, expert_loader=loader.down)
    if hasattr(experts, "gate_up_proj_bias"):
        experts.gate_up_proj_bias = new(num_experts, 2 * local,
                                        weight_loader=lambda p, full, shard: loader.gate_up(p, full, None, None))
        experts.down_proj_bias = new(num_experts, hidden, weight_loader=loader.down_bias)
    moe.intermediate_size = local
    shared = moe.shared_expert
    if shared is not None:
        shared_inter = shared.down_proj.in_features
        shared.gate_up_proj = MergedColumnParallelLinear(hidden, [shared_inter, shared_inter], False, tp,
                                                         device=device, dtype=dtype)
        shared.down_proj = PartialRowParallelLinear(shared_inter, hidden, tp, device=device, dtype=dtype)
    moe.all_reduce = tp.all_reduce


def shard_model(model: nn.Module, tp: TensorParallelGroup, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the layers of a Llama-family ``model`` (built on ``meta``) with this rank's shards, in place;
    ValueError for a model class whose ``supports_tensor_parallel`` is false."""
    if not getattr(model, "supports_tensor_parallel", True):
        raise ValueError(f"{type(model).__name__} does not support tensor_parallel_size > 1")
    c = model.config
    kw = dict(device=device, dtype=dtype)
    for layer in model.layers:
        attn = layer.self_attn
        if getattr(c, "mla", None) is not None:
            shard_latent_attention(attn, c, tp, device, dtype)
        else:
            _shard_attention(attn, c, tp, **kw)
        if isinstance(layer.mlp, FusedMoE):
            shard_experts(layer.mlp, tp, device, dtype)
        else:
            layer.mlp.gate_up_proj = MergedColumnParallelLinear(
                c.hidden_size, [c.intermediate_size, c.intermediate_size], c.mlp_bias, tp, **kw)
            layer.mlp.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, c.mlp_bias, tp, **kw)
        # the part of each projection this rank holds, by module (LoRA reads it after the device kernels, which may
        # have replaced the sharded linears)
        layer.parallel_slices = {f"{owner}.{name}": module.parallel_slice for owner in ("self_attn", "mlp")
                                 for name, module in getattr(layer, owner).named_children()
                                 if isinstance(getattr(module, "parallel_slice", None), ParallelSlice)}
    model.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp, **kw)
    model.lm_head = ParallelLMHead(model.embed_tokens, c.tie_word_embeddings, **kw)


def shard_latent_attention(attn: nn.Module, c, tp: TensorParallelGroup, device, dtype) -> None:
    """A DeepSeek latent attention: this rank's query heads in ``q_proj``/``q_b_proj``, their rows of
    ``kv_b_proj`` and their columns of ``o_proj`` (row-parallel); the latent projections, their norms and the latent
    cache (one shared head) stay whole on every rank."""
    m, heads, world = c.mla, c.num_heads, tp.world_size
    if heads % world:
        raise ValueError(f"{heads} attention heads cannot be split over {world} ranks")
    local = heads // world
    qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    name = "q_proj" if attn.q_proj is not None else "q_b_proj"
    q_in = c.hidden_size if name == "q_proj" else m.q_lora_rank
    q = MergedColumnParallelLinear(q_in, [heads * qk_dim], False, tp, device=device, dtype=dtype)
    _attach_loader(q.weight, lambda param, full, shard: q.load_shard(param, full, 0))
    setattr(attn, name, q)
    rows = local * (m.qk_nope_head_dim + m.v_head_dim)  # each head's key rows, then its value rows
    kv_b = attn.kv_b_proj
    kv_b.weight = nn.Parameter(torch.empty(rows, m.kv_lora_rank, device=device, dtype=dtype), requires_grad=False)
    _attach_loader(kv_b.weight, functools.partial(_load_rows, start=tp.rank * rows))
    kv_b.num_heads = attn.num_heads = local
    attn.o_proj = RowParallelLinear(heads * m.v_head_dim, c.hidden_size, c.o_bias, tp, device=device, dtype=dtype)


def _shard_attention(attn: nn.Module, c, tp: TensorParallelGroup, **kw) -> None:
    """A Llama-family attention: this rank's query heads and key/value heads, the output row-parallel."""
    qkv = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.qkv_bias, tp, **kw)
    attn.qkv_proj = qkv
    attn.num_heads, attn.num_kv_heads = qkv.local_heads, qkv.local_kv_heads
    attn.q_size, attn.kv_size = qkv.local_heads * c.head_dim, qkv.local_kv_heads * c.head_dim
    attn.kv_heads_held = KVHeadsHeld(qkv.kv_head_start, c.num_kv_heads)  # (a checkpoint's per-head KV scales)
    attn.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, tp, **kw)
    if getattr(attn, "sinks", None) is not None:  # one sink logit per query head: this rank's heads
        attn.sinks = nn.Parameter(torch.empty(qkv.local_heads, **kw))
        _attach_loader(attn.sinks, functools.partial(_load_rows, start=qkv.q_head_start))


@dataclass(frozen=True, slots=True)
class KVHeadsHeld:
    """Which of a layer's ``total`` KV heads a rank's attention holds: ``num_kv_heads`` of them from ``start``."""

    start: int
    total: int


class PeerFusedRMSNorm(RMSNorm):
    """The RMSNorm after a row-parallel layer, with peer memory: a :class:`PartialSum` input is summed over the
    ranks, added to the residual and normalized in one kernel; any other input goes to the norm this one replaced
    (the device's). Shares that norm's weight."""

    def __init__(self, norm: RMSNorm) -> None:
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps
        self.unfused = norm.forward  # a bound method, not a child module: the parameters keep their names

    def forward(self, x: torch.Tensor | PartialSum, residual: torch.Tensor | None = None):
        if isinstance(x, PartialSum):
            assert residual is not None, "a partial sum is only fused into a norm with a residual"
            return x.add_rms_norm(residual, self.weight, self.eps)
        return self.unfused(x, residual)


def fuse_peer_norms(model: nn.Module, tp: TensorParallelGroup) -> int:
    """With peer memory (``tp.peer``), fuse the all-reduce of every row-parallel layer of a sharded model into the
    RMSNorm that reads it: the attention output projection feeds the post-attention norm, the MLP down projection
    the next layer's input norm or the final norm; the two staging buffers alternate through the model. Returns
    how many norms were fused (none without peer memory, or for a model whose ``fuses_peer_norms`` is false).
    Call after the weights are loaded and the device's kernels are in place."""
    if tp.peer is None or not getattr(model, "fuses_peer_norms", True):
        return 0
    fused = 0
    previous_mlp_row_parallel = False  # the first layer's input norm reads the embeddings
    for layer in model.layers:
        layer.self_attn.o_proj.stage_index = 0
        layer.post_attention_layernorm = PeerFusedRMSNorm(layer.post_attention_layernorm)
        fused += 1
        if previous_mlp_row_parallel:
            layer.input_layernorm = PeerFusedRMSNorm(layer.input_layernorm)
            fused += 1
        # A mixture-of-experts block all-reduces itself; a dense MLP hands its partial sum to the next norm.
        previous_mlp_row_parallel = isinstance(getattr(layer.mlp, "down_proj", None), RowParallelLinear)
        if previous_mlp_row_parallel:
            layer.mlp.down_proj.stage_index = 1
    if previous_mlp_row_parallel:
        model.norm = PeerFusedRMSNorm(model.norm)
        fused += 1
    return fused


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer still on ``meta`` real (uninitialized) storage, keeping tied weights tied;
    rotary tables are recomputed."""
    lm_head_weight = getattr(model.lm_head, "weight", None)  # None on a pipeline stage without the LM head
    tied = lm_head_weight is not None and lm_head_weight is getattr(model.embed_tokens, "weight", None)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.empty_like(buf, device=device), persistent=False)
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    if callable(rebuild := getattr(model, "materialized", None)):  # parts whose buffers must be computed (a vision
        rebuild(device)  # tower of transformers' modules: position ids, rotary frequencies)
