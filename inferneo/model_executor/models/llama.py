"""Llama-family decoder (Llama 2, Llama 3, Mistral), written as plain modules over flat token batches.

The Qwen2 and Qwen3 files reuse these modules with their own switches (bias on q/k/v, per-head q/k norms).
Inputs are flat: ``input_ids`` and ``positions`` are ``[num_tokens]``, the attention metadata says which tokens
belong to which request. The q/k/v and gate/up projections are fused into one matmul each; ``load_weights``
maps checkpoint names onto the fused parameters.

The code here is plain PyTorch, the same on every device. Kernels for a device (native CPU kernels, Triton on
CUDA, packed matmuls, the tensor-parallel fused all-reduce + norm) take the place of these modules once, after the
weights are loaded (``inferneo.model_executor.device_kernels``), not by checks inside ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend, AttentionFeature, AttentionMetadata, attention_features
from inferneo.attention.fp8_kv import KVCacheScales
from inferneo.attention.kv_spec import KVCacheSpec
from inferneo.model_executor.layers.basic import RMSNorm, SiluAndMul
from inferneo.model_executor.layers.moe import MoeConfig
from inferneo.model_executor.layers.rotary import (
    MRotaryEmbedding,
    RotaryEmbedding,
    mrope_section_of,
    rope_scaling_from_hf,
)

# transformers' ``ACT2FN`` names for SiLU, the one activation the gated MLP and the experts compute
SILU_ACTIVATIONS = ("silu", "swish")


@dataclass(slots=True)
class DecoderConfig:
    """The architecture values a Llama-like decoder needs, read from a Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # Hugging Face's per-layer "full_attention" / "sliding_attention"; None: ``sliding_window`` (if any) applies to
    # every layer.
    layer_types: tuple[str, ...] | None = None
    moe: MoeConfig | None = None  # mixture-of-experts models only (``models/moe.py``)
    # the labels of a sequence classifier's ``score`` head (``models/decoder_classifier.py``); 0 for a causal LM
    num_labels: int = 0
    # Qwen2-VL's M-RoPE: the rotary frequencies' three sections (temporal, height, width); None: plain rotary
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"layer_types {sorted(unknown)} are not supported; supported: full_attention, "
                                 "sliding_attention")
        if not self.sliding_window:  # Qwen2-MoE writes 0 for "no window"
            self.sliding_window = None

    def sliding_window_for(self, layer_index: int) -> int | None:
        """The attention window of layer ``layer_index``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer_index] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, cfg: dict, *, silu_mlp: bool = True, **overrides) -> DecoderConfig:
        """The config of a Hugging Face ``config.json`` (``cfg``), with ``overrides`` in place of the values read.

        ``silu_mlp``: the model's feed-forward blocks are SiLU-gated, whatever the checkpoint says, so a
        ``hidden_act`` that is not SiLU is refused (ValueError naming it) rather than computed as SiLU; models with
        their own activation (Gemma's GELU, gpt-oss's clamped SwiGLU) pass False and check theirs.
        """
        if silu_mlp:
            check_silu_activation(cfg)
        check_full_rotary(cfg)
        num_heads = cfg["num_attention_heads"]
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")  # transformers 5 keeps rope values there
        values = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling_from_hf(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window"),
            layer_types=cfg.get("layer_types"),
            mrope_section=mrope_section_of(cfg),
        )
        values.update(overrides)
        return cls(**values)


def check_silu_activation(cfg: dict) -> None:
    """ValueError unless ``cfg``'s ``hidden_act`` (SiLU when absent) is SiLU."""
    activation = cfg.get("hidden_act") or "silu"
    if activation not in SILU_ACTIVATIONS:
        architecture = ", ".join(cfg.get("architectures") or ()) or cfg.get("model_type", "this model")
        raise ValueError(f"{architecture} with hidden_act {activation!r} is not supported; supported: "
                         f"{', '.join(SILU_ACTIVATIONS)}")


def check_full_rotary(cfg: dict) -> None:
    """ValueError for a ``partial_rotary_factor`` other than 1 (rotary embeddings over part of each head), at the
    top level or in ``rope_scaling`` / ``rope_parameters`` (per layer type too): every model here rotates whole
    heads, and Hugging Face's Llama-style models either fail on such a config or rotate whole heads too."""
    params = cfg.get("rope_parameters")
    nested = [v for v in params.values() if isinstance(v, dict)] if isinstance(params, dict) else []
    for source in (cfg, cfg.get("rope_scaling"), params, *nested):
        if isinstance(source, dict) and float(source.get("partial_rotary_factor") or 1.0) != 1.0:
            architecture = ", ".join(cfg.get("architectures") or ()) or cfg.get("model_type", "this model")
            raise ValueError(f"{architecture} with partial_rotary_factor {source['partial_rotary_factor']} is not "
                             "supported (rotary embeddings over whole heads only)")


class Attention(nn.Module):
    """Self-attention with rotary positions over the paged cache.

    ``sliding_window``, ``logit_softcap`` and ``use_sinks`` (a learned per-head sink logit, the parameter
    ``sinks``) are this layer's attention options, passed on to the backend; ``scale`` defaults to
    ``head_dim ** -0.5``. ``kv_scales`` (set by the runner for an FP8 KV cache; None otherwise) are the layer's
    per-head key and value scales.
    """

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int, *,
                 sliding_window: int | None = None, logit_softcap: float | None = None, use_sinks: bool = False,
                 scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if use_sinks else None
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        if config.mrope_section is None:
            self.rotary = RotaryEmbedding(self.head_dim, max_position, config.rope_theta, config.rope_scaling)
        else:
            self.rotary = MRotaryEmbedding(self.head_dim, max_position, config.rope_theta, config.rope_scaling,
                                           config.mrope_section)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend
        self.kv_scales: KVCacheScales | None = None

    def forward(self, positions, hidden, kv_cache, metadata: AttentionMetadata):
        return self.forward_qkv(positions, self.qkv_proj(hidden), kv_cache, metadata)

    def forward_qkv(self, positions, qkv, kv_cache, metadata: AttentionMetadata):
        """:meth:`forward` from the fused q/k/v projection's output (device kernels may compute it together with
        the norm before it)."""
        return self.o_proj(self.attend_qkv(positions, qkv, kv_cache, metadata))

    def attend_qkv(self, positions, qkv, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        """:meth:`forward_qkv` without the output projection: the attention output ``[T, heads * head_dim]``
        (device kernels may fuse what follows into the output projection)."""
        q, k, v = self.split_heads(qkv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.attend_heads(q, k, v, kv_cache, metadata).reshape(-1, self.q_size)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``[T, heads, head_dim]`` of the queries, keys and values in the fused projection output."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def attend_heads(self, q, k, v, kv_cache, metadata: AttentionMetadata, **backend_options) -> torch.Tensor:
        """Attention over the paged cache (which takes the new keys and values): the backend's ``[T, heads,
        head_dim]`` output with this layer's attention options. ``backend_options``: extra keywords for the
        backend's ``forward`` (device kernels use them)."""
        return self.backend.forward(q, k, v, kv_cache, metadata, self.scale, sliding_window=self.sliding_window,
                                    logit_softcap=self.logit_softcap, sinks=self.sinks, kv_scales=self.kv_scales,
                                    **backend_options)

    def attention_features(self) -> frozenset[AttentionFeature]:
        """What this layer needs from the attention backend (the runner checks it against the backend's)."""
        return attention_features(self.sliding_window, self.logit_softcap, self.sinks is not None,
                                  self.kv_scales is not None)


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Layer ``layer_index`` of the decoder: its attention takes that layer's window from the config."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int,
                 mlp: nn.Module | None = None, layer_index: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(config, backend, max_position,
                                   sliding_window=config.sliding_window_for(layer_index))
        self.mlp = mlp if mlp is not None else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        return self.feed_forward(hidden, residual)

    def feed_forward(self, hidden, residual):
        """The attention output through the residual add and post-attention norm, then the MLP; returns the MLP
        output and the residual (device kernels may fuse the norm into what follows: ``device_kernels``)."""
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """A Llama-like causal LM over flat token batches and a paged KV cache.

    What the runner reads of it is :class:`~inferneo.model_executor.models.interface.CausalLM`: ``config``,
    ``num_kv_heads``, ``cast``, ``forward``, ``compute_logits`` and ``load_weights``.
    """

    # Whether tensor parallelism over peer memory may fuse each row-parallel all-reduce into the residual add and
    # RMSNorm after it (``tensor_parallel.fuse_peer_norms``): true of Llama's layer layout.
    fuses_peer_norms = True
    # Its forward may start from given embeddings (``input_embeds``): it takes prompts given as embeddings.
    accepts_prompt_embeds = True

    # checkpoint name fragment -> (fused parameter fragment, shard index)
    stacked_params = (
        ("q_proj", "qkv_proj", 0),
        ("k_proj", "qkv_proj", 1),
        ("v_proj", "qkv_proj", 2),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg)

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.build_layer(config, backend, max_position, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def build_layer(self, config: DecoderConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        """Decoder layer ``layer_index`` (models whose layers differ from Llama's override this)."""
        return DecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index), layer_index=layer_index)

    def build_mlp(self, config: DecoderConfig, layer_index: int) -> nn.Module:
        """The feed-forward block of layer ``layer_index`` (mixture-of-experts models override this)."""
        return MLP(config)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads each layer holds: all of them, or this rank's once the model is sharded."""
        return self.layers[0].self_attn.num_kv_heads

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """What each layer keeps in the KV cache: this rank's key/value heads of ``head_dim``, in the layout of the
        engine's attention backend."""
        return [KVCacheSpec(layer.self_attn.backend, layer.self_attn.num_kv_heads, layer.self_attn.head_dim)
                for layer in self.layers]

    def cast(self, dtype: torch.dtype) -> None:
        """Parameters to ``dtype``; the rotary tables stay in float32 whatever the model dtype."""
        self.to(dtype=dtype)
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.float()

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], metadata: AttentionMetadata,
                input_embeds: torch.Tensor | None = None):
        """Hidden states ``[num_tokens, hidden]`` for the flat batch; writes the new tokens' K/V. ``input_embeds``
        (a step with image tokens or a prompt given as embeddings): the embeddings to start from instead of
        ``embed(input_ids)``."""
        hidden = self.embed(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``input_ids`` (models that scale them override this)."""
        return self.embed_tokens(input_ids)

    def prompt_embeds_to_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """A prompt's given embeddings as ``embed``'s output: they are what Hugging Face's
        ``model.get_input_embeddings()(ids)`` returns (vLLM's ``prompt_embeds``), which for Llama is ``embed``'s
        output itself; models that scale the table's rows inside the model override this."""
        return embeds

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits; None on tensor-parallel ranks other than the driver."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    # ---- weights -----------------------------------------------------------------------------------------

    def _shard_sizes(self, fused: str, param: torch.Tensor) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [param.shape[0] // 2] * 2  # gate/up: the dense MLP's or a shared expert's width

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> set[str]:
        """Load a checkpoint tensor the plain name mapping does not cover; returns the keys it loaded (none: not
        special). Mixture-of-experts models load their per-expert weights here."""
        return set()

    def expected_weight_keys(self, pname: str, param: torch.Tensor) -> list[str]:
        """The load keys parameter ``pname`` needs: itself, or one per fused shard."""
        fused = next((f for _, f, _ in self.stacked_params if f".{f}." in pname), None)
        if fused is None:
            return [pname]
        return [f"{pname}#{i}" for i in range(len(self._shard_sizes(fused, param)))]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters; returns the names loaded.

        Raises ValueError for a shape that does not match the config, a name the model does not have, and (with
        ``strict``) for a weight the tensors left out.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name.startswith("lm_head") and self.config.tie_word_embeddings):
                continue
            special = self.load_special_weight(params, name, tensor)
            if special:
                loaded |= special
                continue
            for shard_name, fused, index in self.stacked_params:
                if f".{shard_name}." in name:
                    target = name.replace(shard_name, fused)
                    param = _lookup(params, target, name)
                    sizes = self._shard_sizes(fused, param)
                    offset = sum(sizes[:index])
                    loader = getattr(param, "weight_loader", None)  # a tensor-parallel shard takes its slice
                    if loader is not None:
                        loader(param, tensor, index)
                    else:
                        _copy(param.data.narrow(0, offset, sizes[index]), tensor, name)
                    loaded.add(f"{target}#{index}")
                    break
            else:
                param = _lookup(params, name, name)
                loader = getattr(param, "weight_loader", None)
                if loader is not None:
                    loader(param, tensor, None)
                else:
                    _copy(param.data, tensor, name)
                loaded.add(name)
        missing = self.expected_load_keys() - loaded if strict else set()
        if missing:
            names = sorted({self.checkpoint_name(key) for key in missing})
            raise ValueError(f"checkpoint is missing weights: {', '.join(names[:8])}"
                             + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
        return loaded

    def expected_load_keys(self) -> set[str]:
        """Every load key a whole checkpoint writes (``load_weights`` checks them; a weight update counts them)."""
        expected: set[str] = set()
        for pname, param in self.named_parameters():
            expected.update(self.expected_weight_keys(pname, param))
        return expected

    def checkpoint_name(self, key: str) -> str:
        """The checkpoint's (Hugging Face) name for a load key: a fused shard ``...qkv_proj.weight#1`` is
        ``model...k_proj.weight``; keys of other kinds are returned as they are."""
        pname, _, index = key.partition("#")
        if index:
            pair = next(((shard, fused) for shard, fused, i in self.stacked_params
                         if f".{fused}." in pname and str(i) == index), None)
            if pair is None:
                return key
            pname = pname.replace(pair[1], pair[0])
        return pname if pname.startswith("lm_head") else f"model.{pname}"


def _lookup(params: dict[str, nn.Parameter], name: str, original: str) -> nn.Parameter:
    try:
        return params[name]
    except KeyError:
        raise ValueError(f"checkpoint weight {original!r} does not belong to this model") from None


def _copy(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(src.shape)}, the config expects {tuple(dest.shape)}")
    dest.copy_(src)
