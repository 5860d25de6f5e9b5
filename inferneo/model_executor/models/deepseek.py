"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and grouped mixture-of-experts routing.

Attention (``LatentAttention``). Queries come from ``q_proj``, or through a low-rank pair ``q_a_proj`` ->
``q_a_layernorm`` -> ``q_b_proj`` when ``q_lora_rank`` is set; each head's query is a non-rope part
(``qk_nope_head_dim``) and a rope part (``qk_rope_head_dim``). ``kv_a_proj_with_mqa`` gives per token one latent
(``kv_lora_rank``, then ``kv_a_layernorm``) and one rope key shared by all heads; ``kv_b_proj`` would expand the
latent into every head's non-rope key and value. Rotary embeddings apply to the rope parts only, with DeepSeek's
interleaved pairs (V2 always, V3 with ``rope_interleave``) read as even channels then odd ones, so that the
rotate-half rotation gives the same dot products as Hugging Face's. The softmax scale is
``1/sqrt(qk_nope_head_dim + qk_rope_head_dim)``, times ``mscale**2`` for yarn rope scaling with ``mscale_all_dim``.

The KV cache keeps only the latent and the rotated rope key per token (``kv_lora_rank + qk_rope_head_dim`` values,
one shared head; :mod:`inferneo.attention.mla`). Attention runs in the absorbed form in every phase: the query's
non-rope part goes through the key half of ``kv_b_proj`` into latent space, the backend attends over the latent
cache (keys = latent and rope key, values = latent) and its output goes through the value half of ``kv_b_proj``
before ``o_proj``. ``kv_b_proj`` is therefore kept as its weight alone (``LatentExpansion``), never as a linear.

Feed-forward. The first ``first_k_dense_replace`` layers (and, as in DeepSeek's own code, layers whose index is
not a multiple of ``moe_layer_freq``; transformers ignores it, and released checkpoints have 1) are dense MLPs; the others are ``DeepseekMoE``: a ``FusedMoE`` (whose expert
kernel a device may replace) routed in float32 by DeepSeek's grouped top-k
(:mod:`~inferneo.model_executor.layers.moe_routing`), plus
``n_shared_experts`` shared experts as one plain MLP of ``n_shared_experts * moe_intermediate_size``.

Checkpoints name experts one by one (``mlp.experts.{e}.gate_proj/up_proj/down_proj``) or stacked; both load
(``MoeForCausalLM``). Layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layer) are skipped.
Tensor parallelism splits the attention heads (``q_proj``/``q_b_proj``, ``kv_b_proj``, ``o_proj``) with the
latent projections and the latent cache replicated on every rank, and the experts as for the other MoE models
(``tensor_parallel.shard_latent_attention``, ``shard_experts``). Quantized (fp8) checkpoints are refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.attention.kv_spec import KVCacheSpec
from inferneo.attention.mla import TorchMLABackend
from inferneo.model_executor.layers.basic import RMSNorm
from inferneo.model_executor.layers.moe import FusedMoE
from inferneo.model_executor.layers.moe_routing import (
    RouterOutput,
    sigmoid_grouped_topk,
    softmax_grouped_topk,
)
from inferneo.model_executor.layers.rotary import RotaryEmbedding, _yarn_mscale
from inferneo.model_executor.models.llama import MLP, DecoderConfig, DecoderLayer
from inferneo.model_executor.models.moe import MoeForCausalLM

logger = logging.getLogger(__name__)

# HF's DeepSeek norms inside attention (q_a_layernorm, kv_a_layernorm) use their default epsilon, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class MlaConfig:
    """The latent attention values of a DeepSeek config."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float


@dataclass(frozen=True, slots=True)
class DeepseekMoeConfig:
    """The mixture-of-experts values of a DeepSeek config. ``scoring`` is "softmax" (V2) or "sigmoid" (V3)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring: str
    topk_method: str
    num_groups: int
    topk_groups: int
    renormalize: bool
    routed_scaling_factor: float

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` holds experts (else a dense MLP)."""
        return layer_index >= self.first_k_dense_replace and layer_index % self.moe_layer_freq == 0


@dataclass(slots=True)
class DeepseekConfig(DecoderConfig):
    """A decoder config with DeepSeek's latent attention and routing values."""

    mla: MlaConfig | None = None
    deepseek_moe: DeepseekMoeConfig | None = None


def _softmax_scale(cfg: dict, rope_scaling: dict | None) -> float:
    """``1/sqrt(qk head dim)``, times ``mscale**2`` under yarn rope scaling with ``mscale_all_dim`` (as in HF)."""
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = _yarn_mscale(rope_scaling["factor"], mscale_all_dim)
            scale = scale * mscale * mscale
    return scale


def _check_supported(cfg: dict) -> None:
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"quantized DeepSeek checkpoints (quantization_config {method!r}) are not supported; "
                         "use a bf16/fp16/fp32 checkpoint")
    if cfg.get("num_key_value_heads") not in (None, cfg["num_attention_heads"]):
        raise ValueError("DeepSeek latent attention needs num_key_value_heads == num_attention_heads; got "
                         f"{cfg['num_key_value_heads']} and {cfg['num_attention_heads']}")


def deepseek_config_from_hf(cfg: dict, version: int) -> DeepseekConfig:
    """The config of a DeepSeek-V2 (``version`` 2) or V3 (3) checkpoint; ValueError for what is not supported."""
    _check_supported(cfg)
    # The generic head fields describe the cache: one shared head of latent + rope key.
    # V3's MLPs have no biases whatever mlp_bias says (transformers reads it for V2 only).
    base = DeepseekConfig.from_hf(cfg, num_kv_heads=1, head_dim=cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],
                                  **({} if version == 2 else {"mlp_bias": False}))
    mla = MlaConfig(
        q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], rope_interleave=version == 2 or bool(cfg.get("rope_interleave", True)),
        softmax_scale=_softmax_scale(cfg, base.rope_scaling),
    )
    if version == 2:
        topk_method = cfg.get("topk_method") or "greedy"
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method {topk_method!r} is not supported; supported: greedy, "
                             "group_limited_greedy")
        if cfg.get("norm_topk_prob"):
            logger.warning("DeepSeek-V2 norm_topk_prob=true is ignored, as Hugging Face transformers does")
        scoring, renormalize = "softmax", False
    else:
        topk_method, scoring, renormalize = "noaux_tc", "sigmoid", bool(cfg.get("norm_topk_prob", True))
    moe = DeepseekMoeConfig(
        num_experts=cfg["n_routed_experts"], top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"], num_shared_experts=cfg.get("n_shared_experts") or 0,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0, moe_layer_freq=cfg.get("moe_layer_freq") or 1,
        scoring=scoring, topk_method=topk_method, num_groups=cfg.get("n_group") or 1,
        topk_groups=cfg.get("topk_group") or 1, renormalize=renormalize,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )
    if moe.num_experts % moe.num_groups or not 1 <= moe.topk_groups <= moe.num_groups:
        raise ValueError(f"n_routed_experts ({moe.num_experts}) must split into n_group ({moe.num_groups}) groups, "
                         f"of which topk_group ({moe.topk_groups}) are chosen")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(f"num_experts_per_tok must be between 1 and n_routed_experts ({moe.num_experts}); "
                         f"got {moe.top_k}")
    if not moe.num_shared_experts and base.mlp_bias:
        # transformers still builds the 0-wide shared MLP, whose down_proj bias it adds to every token
        raise ValueError("DeepSeek with n_shared_experts 0 and mlp_bias true is not supported")
    base.mla, base.deepseek_moe = mla, moe
    return base


# ---- attention -----------------------------------------------------------------------------------------------


class LatentExpansion(nn.Module):
    """``kv_b_proj`` as its weight ``[H * (qk_nope + v), kv_lora_rank]``: per head, the rows expanding the latent
    into the non-rope key, then those expanding it into the value. Absorbed attention multiplies by its halves."""

    def __init__(self, num_heads: int, key_dim: int, value_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.weight = nn.Parameter(torch.empty(num_heads * (key_dim + value_dim), latent_dim))

    def key_weight(self) -> torch.Tensor:
        """``[H, qk_nope, latent]``: the latent's non-rope key of each head is ``key_weight[h] @ latent``."""
        return self.weight.view(self.num_heads, self.key_dim + self.value_dim, -1)[:, : self.key_dim]

    def value_weight(self) -> torch.Tensor:
        """``[H, v, latent]``: each head's value is ``value_weight[h] @ latent``."""
        return self.weight.view(self.num_heads, self.key_dim + self.value_dim, -1)[:, self.key_dim :]


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention over a compressed cache (see the module doc)."""

    def __init__(self, config: DeepseekConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__()
        m = config.mla
        hidden, heads = config.hidden_size, config.num_heads
        self.num_heads, self.num_kv_heads = heads, 1
        self.nope_dim, self.rope_dim, self.value_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.latent_dim = m.kv_lora_rank
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden, m.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = LatentExpansion(heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank)
        self.o_proj = nn.Linear(heads * m.v_head_dim, hidden, bias=config.o_bias)
        self.rotary = RotaryEmbedding(m.qk_rope_head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.rope_interleave = m.rope_interleave
        self.scale = m.softmax_scale
        self.backend = backend

    def kv_cache_spec(self) -> KVCacheSpec:
        """One shared head of latent + rope key per token, in the latent backend's layout."""
        return KVCacheSpec(self.backend, 1, self.latent_dim + self.rope_dim)

    def forward(self, positions, hidden, kv_cache, metadata: AttentionMetadata):
        tokens = hidden.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        k_rope = k_rope.unsqueeze(1)
        if self.rope_interleave:  # pairs (x0, x1), (x2, x3), ... read in the rotate-half layout [x0, x2, ..., x1, x3, ...]
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope)
        # Absorb the key half of kv_b_proj into the query: [H, T, nope] @ [H, nope, latent] -> [T, H, latent].
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.kv_b_proj.key_weight()).transpose(0, 1)
        query = torch.cat([q_latent, q_rope], dim=-1)
        key = torch.cat([latent.unsqueeze(1), k_rope], dim=-1)  # [T, 1, latent + rope]
        out = self.backend.forward(query, key, key[..., : self.latent_dim], kv_cache, metadata, self.scale)
        # The value half of kv_b_proj: [H, T, latent] @ [H, latent, v] -> [T, H * v].
        out = torch.bmm(out.transpose(0, 1), self.kv_b_proj.value_weight().transpose(1, 2))
        return self.o_proj(out.transpose(0, 1).reshape(tokens, self.num_heads * self.value_dim))


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """The even channels of the last dimension, then the odd ones."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


# ---- mixture of experts --------------------------------------------------------------------------------------


class DeepseekGate(nn.Module):
    """The router's weight ``[E, H]`` (kept in float32, as HF does) and, for sigmoid scoring, the
    ``e_score_correction_bias`` ``[E]`` that steers which experts are chosen."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
                                        if correction_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 router logits ``[T, E]``."""
        return F.linear(x.float(), self.weight.float())


class DeepseekMoE(FusedMoE):
    """Routed experts (a :class:`FusedMoE`: stacked weights, ``expert_kernel``, tensor-parallel sharding) under
    DeepSeek's grouped routing, plus the shared experts as one plain MLP (``shared_expert``, no gate) added to their
    sum. Checkpoints name the shared experts ``shared_experts``; the loader maps them."""

    def __init__(self, config: DeepseekConfig) -> None:
        moe = config.deepseek_moe
        shared = moe.num_shared_experts * moe.intermediate_size
        super().__init__(config.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k, router=None,
                         shared_expert=MLP(config, shared) if shared else None)
        self.routing = moe
        self.gate = DeepseekGate(config.hidden_size, moe.num_experts, correction_bias=moe.scoring == "sigmoid")
        self.router = self.route  # reads the gate's correction bias at every call (it is loaded after building)

    def route(self, logits: torch.Tensor) -> RouterOutput:
        """The experts and weights of every token, from the float32 router ``logits`` ``[T, E]``."""
        moe = self.routing
        if moe.scoring == "sigmoid":
            return sigmoid_grouped_topk(logits, moe.top_k, self.gate.e_score_correction_bias,
                                        num_groups=moe.num_groups, topk_groups=moe.topk_groups,
                                        renormalize=moe.renormalize, routed_scaling_factor=moe.routed_scaling_factor)
        return softmax_grouped_topk(logits, moe.top_k, topk_method=moe.topk_method, num_groups=moe.num_groups,
                                    topk_groups=moe.topk_groups, routed_scaling_factor=moe.routed_scaling_factor)


# ---- the model -----------------------------------------------------------------------------------------------


class DeepseekDecoderLayer(DecoderLayer):
    """A decoder layer with latent attention; its feed-forward block is given (dense MLP or ``DeepseekMoE``)."""

    def __init__(self, config: DeepseekConfig, backend: AttentionBackend, max_position: int,
                 mlp: nn.Module) -> None:
        nn.Module.__init__(self)
        self.self_attn = LatentAttention(config, backend, max_position)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV2ForCausalLM(MoeForCausalLM):
    """DeepSeek-V2: latent attention (q through ``q_proj`` or the q LoRA pair), softmax routing, greedy or limited
    to the best groups, shared experts, dense first layers."""

    version = 2
    # Only the dense MLPs' gate/up are fused; q_proj is DeepSeek's own query projection.
    stacked_params = (("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DeepseekConfig:
        return deepseek_config_from_hf(cfg, cls.version)

    def __init__(self, config: DeepseekConfig, backend: AttentionBackend | None,
                 max_position: int | None = None) -> None:
        # The engine's backend lays out standard K/V caches; every layer here keeps a latent cache in its own.
        super().__init__(config, TorchMLABackend(), max_position)

    def build_layer(self, config: DeepseekConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        return DeepseekDecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index))

    def build_mlp(self, config: DeepseekConfig, layer_index: int) -> nn.Module:
        if config.deepseek_moe.is_sparse(layer_index):
            return DeepseekMoE(config)
        return MLP(config)

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """Every layer's compressed latent cache (see :class:`LatentAttention`)."""
        return [layer.self_attn.kv_cache_spec() for layer in self.layers]

    def cast(self, dtype: torch.dtype) -> None:
        """Parameters to ``dtype``; rotary tables and the routers stay in float32, as in HF."""
        super().cast(dtype)
        for module in self.modules():
            if isinstance(module, DeepseekGate):
                module.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """As the Llama loader, skipping layers past ``num_hidden_layers`` (V3's multi-token-prediction layer);
        ``mlp.shared_experts`` load into ``mlp.shared_expert``."""
        return super().load_weights(((name.replace(".mlp.shared_experts.", ".mlp.shared_expert."), tensor)
                                     for name, tensor in weights if self._in_model(name, tensor)), strict)

    def _in_model(self, name: str, tensor: torch.Tensor) -> bool:
        """False for a layer past ``num_hidden_layers`` and for the empty shared-expert tensors transformers saves
        for ``n_shared_experts: 0`` (an MLP 0 features wide, which adds nothing)."""
        if ".mlp.shared_experts." in name and tensor.numel() == 0:
            return False
        match = _LAYER_INDEX.match(name.removeprefix("model."))
        return match is None or int(match.group(1)) < self.config.num_layers


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3: as V2, with sigmoid routing steered by ``e_score_correction_bias`` ("noaux_tc"), normalised
    top-k weights (``norm_topk_prob``) and ``rope_interleave`` from the config."""

    version = 3
