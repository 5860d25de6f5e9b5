"""Rotary position embedding (rotate-half layout, as in Hugging Face Llama and Qwen), with rope scaling.

``rope_scaling`` is Hugging Face's dict (``rope_type`` or the older ``type``); the engine computes the same inverse
frequencies and cos/sin attention factor as transformers' rope init functions (``modeling_rope_utils``):

- ``default``, ``linear`` (positions divided by ``factor``), ``llama3`` (Llama 3.1's smoothed band).
- ``yarn``: interpolation below the ``beta_slow`` rotation count, extrapolation above ``beta_fast`` (defaults 32 and
  1), a linear ramp between, over ``original_max_position_embeddings``; ``truncate`` (default true; gpt-oss sets it
  false) rounds the ramp's ends to whole dimensions. cos and sin are multiplied by ``attention_factor``, which when
  absent is ``0.1 * ln(factor) + 1``, or with ``mscale`` and ``mscale_all_dim`` both set the ratio of
  ``0.1 * m * ln(factor) + 1`` for the two (DeepSeek).
- ``longrope`` (``su``): frequencies divided per dimension by ``short_factor`` or ``long_factor``; cos and sin are
  multiplied by ``attention_factor``, by default ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))``
  with ``factor`` defaulting to ``max_position_embeddings / original_max_position_embeddings`` (L). Hugging Face's
  generation rotates a prompt of at most L tokens with the short factors, and a longer one with the long factors;
  when a sequence grows past L it computes the whole sequence again with the long factors (Phi-3's
  ``prepare_inputs_for_generation`` drops the cache there). The engine does the same: with a context longer than
  L, a sequence whose prompt is longer than L rotates by the long factors, and one that grows past L is computed
  again (``Request.long_rope``, set by the scheduler; the prefix cache keeps long sequences' blocks apart). The
  cos/sin table holds a row per position (short below L, long from L) followed by L long rows for the positions
  below L, which the runner gives the tokens of long sequences (:class:`LongRopeSwitch`). With a context of at most
  L every token takes the short factors.
- ``dynamic`` (NTK): Hugging Face keeps the plain frequencies up to ``max_position_embeddings`` and recomputes a
  larger base for the whole batch beyond it. The engine's context never exceeds ``max_position_embeddings``
  (``resolve_max_model_len``), so it uses the plain frequencies, which is exactly Hugging Face within that length; a
  rotary table longer than the original length is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
_ALIASES = {"su": "longrope"}  # the name early Phi-3 configs used
# Types whose ``original_max_position_embeddings`` a config may also give at its top level (Phi-3 does); as in
# transformers, the top-level value wins.
_ORIGINAL_LENGTH_TYPES = ("llama3", "yarn", "longrope")


@dataclass(frozen=True, slots=True)
class LongRopeSwitch:
    """Where LongRoPE's two rotations meet in a context longer than ``original`` (L) positions (see the module
    docstring): the table row of a token at position ``p`` is ``p``, except for a sequence on the long rotation at
    ``p < L``, where it is ``long_rows + p``."""

    original: int
    long_rows: int

    def long_prompt(self, num_prompt_tokens: int) -> bool:
        """Whether a sequence with a prompt of this length rotates every token with the long factors from the
        start."""
        return num_prompt_tokens > self.original


def longrope_switch(scaling: dict | None, max_position: int) -> LongRopeSwitch | None:
    """The switch of a LongRoPE ``scaling`` in a context of ``max_position`` positions; None for other scalings and
    for a context within the original length (every token short)."""
    if rope_type_of(scaling) != "longrope":
        return None
    original = int(scaling["original_max_position_embeddings"])
    return LongRopeSwitch(original, max_position) if max_position > original else None


@dataclass(frozen=True)
class RopeFrequencies:
    """What a rope scaling gives: ``inv_freq`` ``[head_dim // 2]`` (float32) and the factor cos/sin are
    multiplied by."""

    inv_freq: torch.Tensor
    attention_factor: float = 1.0


def rope_type_of(scaling: dict | None) -> str:
    """The canonical rope type of a ``rope_scaling`` dict (``default`` for None)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return _ALIASES.get(kind, kind)


def rope_scaling_from_hf(cfg: dict, *, default_original: int | None = None) -> dict | None:
    """``cfg``'s rope scaling as one complete dict (None for plain rope), filled in the way transformers reads it.

    Reads ``rope_scaling``, else transformers 5's ``rope_parameters`` (without ``rope_theta``). The result has a
    canonical ``rope_type``; for llama3, yarn and longrope an ``original_max_position_embeddings`` (the config's
    top-level one first, then the dict's, then ``default_original``, then ``max_position_embeddings``); for yarn
    and longrope a ``factor`` (``max_position_embeddings / original_max_position_embeddings`` when absent); for
    dynamic the ``original_max_position_embeddings`` it starts scaling at (``max_position_embeddings``).
    """
    scaling = cfg.get("rope_scaling")
    if not scaling and isinstance(cfg.get("rope_parameters"), dict):
        scaling = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    rope_type = rope_type_of(scaling)
    if rope_type in ("default", "mrope"):  # "mrope": Qwen2-VL's, plain frequencies (sections: mrope_section_of)
        return None
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = rope_type
    max_position = cfg.get("max_position_embeddings")
    if rope_type in _ORIGINAL_LENGTH_TYPES:
        original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original or default_original or max_position
    if rope_type == "dynamic":
        scaling["original_max_position_embeddings"] = max_position
    if rope_type in ("yarn", "longrope") and scaling.get("factor") is None and max_position:
        scaling["factor"] = max_position / scaling["original_max_position_embeddings"]
    return scaling


def _require(scaling: dict, rope_type: str, *keys: str) -> list[Any]:
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}; got {scaling}")
    return [scaling[k] for k in keys]


def _plain_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, old_len = _require(scaling, "llama3", "factor", "original_max_position_embeddings")
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict) -> RopeFrequencies:
    factor, original = _require(scaling, "yarn", "factor", "original_max_position_embeddings")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:  # the dimension that turns ``rotations`` times over ``original``
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # 1 where the frequency is kept, 0 where it is divided by ``factor``
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    return RopeFrequencies(inv_freq, float(attention_factor))


def _longrope(head_dim: int, theta: float, scaling: dict, max_position: int) -> RopeFrequencies:
    short, long, original = _require(scaling, "longrope", "short_factor", "long_factor",
                                     "original_max_position_embeddings")
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != head_dim // 2:
            raise ValueError(f"rope_scaling {name} has {len(factors)} values; head_dim {head_dim} needs "
                             f"{head_dim // 2}")
    factor = scaling.get("factor")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if factor is None:
            raise ValueError("rope_scaling of type 'longrope' needs factor or attention_factor (or a config with "
                             "max_position_embeddings, through rope_scaling_from_hf)")
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(long if max_position > original else short, dtype=torch.float32)
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return RopeFrequencies(1.0 / (ext * theta**shape), float(attention_factor))


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, max_position: int) -> RopeFrequencies:
    """The inverse frequencies and cos/sin factor of ``scaling`` for a table of ``max_position`` positions.

    ``scaling`` as :func:`rope_scaling_from_hf` returns it (a raw config dict works when it names every value its
    type needs). ValueError for an unsupported type or a missing value.
    """
    rope_type = rope_type_of(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "longrope":
        return _longrope(head_dim, theta, scaling, max_position)
    inv_freq = _plain_inv_freq(head_dim, theta)
    if rope_type == "linear":
        (factor,) = _require(scaling, "linear", "factor")
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif rope_type == "dynamic":
        original = scaling.get("original_max_position_embeddings")
        if original is not None and max_position > original:
            raise ValueError(f"dynamic (NTK) rope scaling beyond the original {original} positions is not supported "
                             f"(asked for {max_position}); use max_model_len <= {original}")
    return RopeFrequencies(inv_freq)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to flat ``[num_tokens, num_heads, head_dim]`` queries and keys.

    ``cos_cache``/``sin_cache`` ``[max_position, head_dim // 2]`` (float32) already carry the scaling's attention
    factor, so every kernel that reads them applies it."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position, self.theta, self.scaling = max_position, theta, scaling
        self.switch = longrope_switch(scaling, max_position)
        self.build_cache(None)

    def build_cache(self, device: torch.device | None) -> None:
        """(Re)compute the float32 cos/sin tables, on ``device`` or the default device (with a LongRoPE switch, the
        rows of :class:`LongRopeSwitch`)."""
        rope = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_position)
        cos, sin = _table(torch.arange(self.max_position, dtype=torch.float32, device=device), rope)
        if self.switch is not None:
            original = self.switch.original
            short = rope_frequencies(self.head_dim, self.theta, self.scaling, original)
            below = torch.arange(original, dtype=torch.float32, device=device)
            short_cos, short_sin = _table(below, short)
            cos = torch.cat((short_cos, cos[original:], cos[:original]))
            sin = torch.cat((short_sin, sin[original:], sin[:original]))
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal rotary embedding (M-RoPE): the ``head_dim // 2`` frequencies fall into three
    consecutive ``sections`` (``rope_scaling.mrope_section``), rotated by a token's temporal, height and width
    position respectively.

    ``positions`` is ``[num_tokens]`` (the three positions equal: a text token, where M-RoPE is the plain rotary
    embedding, through the same tables) or ``[3, num_tokens]`` (an image's tokens among them: their grid
    positions); :meth:`rows` gives the per-token cos/sin rows of the latter for the kernels that read tables."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None,
                 sections: tuple[int, ...]) -> None:
        if len(sections) != 3 or sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {list(sections)} must be three sections adding up to head_dim / 2 "
                             f"({head_dim // 2})")
        super().__init__(head_dim, max_position, theta, scaling)
        self.sections = tuple(int(n) for n in sections)

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[num_tokens, head_dim // 2]`` of 3D ``positions`` ``[3, num_tokens]``: each section's
        columns from the table row of its own position."""
        cos, sin = [], []
        start = 0
        for axis, width in enumerate(self.sections):
            cos.append(self.cos_cache.index_select(0, positions[axis])[:, start : start + width])
            sin.append(self.sin_cache.index_select(0, positions[axis])[:, start : start + width])
            start += width
        return torch.cat(cos, dim=1), torch.cat(sin, dim=1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cos, sin = self.rows(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def mrope_section_of(cfg: dict) -> tuple[int, ...] | None:
    """The M-RoPE sections of a config (``mrope_section`` in ``rope_scaling`` or transformers 5's
    ``rope_parameters``), or None for a model without M-RoPE."""
    for source in (cfg.get("rope_scaling"), cfg.get("rope_parameters")):
        if isinstance(source, dict) and source.get("mrope_section"):
            return tuple(int(n) for n in source["mrope_section"])
    return None


class InterleavedRotaryEmbedding(RotaryEmbedding):
    """Rotary embedding over interleaved pairs (GPT-J style: dimensions ``2i`` and ``2i + 1`` rotate together),
    as Command-R and GLM rotate, where :class:`RotaryEmbedding` pairs dimension ``i`` with ``i + head_dim / 2``.
    Its ``head_dim`` is the width it rotates: the first ``head_dim`` dimensions of each head (GLM's partial rotary
    embedding), the rest pass through unchanged. The device's in-place rotary kernels compute the other pairing, so
    attentions using this one keep their PyTorch path."""

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
        return _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    width = 2 * cos.shape[-1]
    xf = x.float()
    even, odd = xf[..., 0:width:2], xf[..., 1:width:2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    if width < x.shape[-1]:
        rotated = torch.cat((rotated, xf[..., width:]), dim=-1)
    return rotated.to(x.dtype)


def _table(positions: torch.Tensor, rope: RopeFrequencies) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[len(positions), head_dim // 2]`` of ``rope`` at ``positions``, times its attention factor."""
    freqs = torch.outer(positions, rope.inv_freq.to(positions.device))
    cos, sin = freqs.cos(), freqs.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def model_rope_switch(model: nn.Module) -> LongRopeSwitch | None:
    """The LongRoPE switch of ``model``'s rotary layers (they all share one), or None when none has one."""
    switches = {module.switch for module in model.modules() if isinstance(module, RotaryEmbedding)}
    switches.discard(None)
    if len(switches) > 1:
        raise ValueError(f"rotary layers with different LongRoPE switches: {sorted(switches, key=str)}")
    return next(iter(switches), None)


def share_rotary_tables(model: nn.Module) -> int:
    """Make the rotary layers of ``model`` whose cos/sin tables are equal hold one pair of tables between them (each
    attention layer builds its own; 30 layers of 8,192 positions are 60 MiB of copies). Call once the model has its
    final device and dtype (``cast`` replaces buffers); returns how many layers gave up their own tables."""
    kept: list[RotaryEmbedding] = []
    shared = 0
    for module in model.modules():
        if not isinstance(module, RotaryEmbedding) or module.cos_cache.is_meta:
            continue
        same = next((k for k in kept if k.cos_cache.shape == module.cos_cache.shape
                     and k.cos_cache.device == module.cos_cache.device and k.cos_cache.dtype == module.cos_cache.dtype
                     and torch.equal(k.cos_cache, module.cos_cache) and torch.equal(k.sin_cache, module.sin_cache)),
                    None)
        if same is None:
            kept.append(module)
        elif same.cos_cache is not module.cos_cache or same.sin_cache is not module.sin_cache:
            module.register_buffer("cos_cache", same.cos_cache, persistent=False)
            module.register_buffer("sin_cache", same.sin_cache, persistent=False)
            shared += 1
    return shared
