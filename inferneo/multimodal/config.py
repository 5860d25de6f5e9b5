"""What a vision-language checkpoint says about its images, read from its ``config.json``.

The engine serves such a checkpoint as its language model (``hf_files.hf_config`` hands over the ``text_config``,
completed with transformers' defaults) with this record beside it, under the key :data:`VISION_LANGUAGE_KEY`: the
vision tower's config, the token that stands for image features in a prompt, how many of them one image becomes,
and how the tower's hidden states become those features (LLaVA's ``vision_feature_layer`` and
``vision_feature_select_strategy``, the projector's activation and bias).

Qwen2-VL and Qwen2.5-VL (:data:`MROPE_ARCHITECTURES`) keep the same record: their vision tower's config, their
``<|image_pad|>`` token; an image's token count follows its patch grid (:meth:`VisionLanguageConfig.tokens_of`) and
their language model rotates by M-RoPE (``multimodal/mrope.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VISION_LANGUAGE_KEY = "inferneo_vision_language"

# The vision-language architectures served with images, and the vision towers they may have (transformers'
# ``model_type`` of ``vision_config``).
# Qwen's vision-language models: transformers' own vision transformer, images of any size, M-RoPE.
MROPE_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
GEMMA3 = "Gemma3ForConditionalGeneration"
VISION_LANGUAGE_ARCHITECTURES = ("LlavaForConditionalGeneration", *MROPE_ARCHITECTURES, GEMMA3)
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


@dataclass(frozen=True)
class VisionLanguageConfig:
    """A LLaVA-style model's image settings (see the module docstring)."""

    architecture: str
    vision_config: dict[str, Any]
    image_token_id: int
    feature_layer: int | tuple[int, ...]  # hidden states of this tower layer (several: concatenated)
    select_strategy: str  # "default": the CLS position dropped; "full": every position kept
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    # Qwen2-VL's markers around an image's tokens (None: the model has none)
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    # Qwen2-VL: the most pixels its image processor leaves an image (None: unknown)
    max_image_pixels: int | None = None
    # Gemma 3: a fixed count of pooled image tokens, and the begin/end-of-image tokens that frame them (the begin
    # token is the placeholder a prompt writes); None for LLaVA, whose placeholder is the image token itself.
    tokens_per_image: int | None = None
    begin_token_id: int | None = None
    end_token_id: int | None = None

    @classmethod
    def from_hf(cls, config: dict[str, Any], text_hidden_size: int) -> VisionLanguageConfig:
        """The settings of a ``LlavaForConditionalGeneration`` ``config.json`` (transformers' defaults where it
        says nothing); ValueError for a vision tower or feature choice this engine does not serve."""
        if config["architectures"][0] in MROPE_ARCHITECTURES:
            return cls._from_qwen(config, text_hidden_size)
        if config["architectures"][0] == GEMMA3:
            return cls._from_gemma3(config, text_hidden_size)
        vision = dict(config.get("vision_config") or {})
        tower = vision.get("model_type", "clip_vision_model")
        if tower not in VISION_TOWERS:
            raise ValueError(f"vision tower {tower!r} is not supported; supported: {', '.join(VISION_TOWERS)}")
        vision["model_type"] = tower
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported ('default' or 'full')")
        layer = config.get("vision_feature_layer", -2)
        token = config.get("image_token_index", config.get("image_token_id"))
        if not isinstance(token, int):
            raise ValueError("the checkpoint's config.json names no image_token_index")
        return cls(architecture=config["architectures"][0], vision_config=vision, image_token_id=token,
                   feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
                   select_strategy=strategy, projector_act=config.get("projector_hidden_act", "gelu"),
                   projector_bias=bool(config.get("multimodal_projector_bias", True)),
                   text_hidden_size=text_hidden_size)

    @classmethod
    def _from_qwen(cls, config: dict[str, Any], text_hidden_size: int) -> VisionLanguageConfig:
        """The settings of a Qwen2-VL or Qwen2.5-VL ``config.json`` (the LLaVA-only fields at their defaults)."""
        token = config.get("image_token_id", (config.get("text_config") or {}).get("image_token_id"))
        if not isinstance(token, int):
            raise ValueError("the checkpoint's config.json names no image_token_id")
        vision = dict(config.get("vision_config") or {})
        return cls(architecture=config["architectures"][0], vision_config=vision, image_token_id=token,
                   feature_layer=-1, select_strategy="full", projector_act="gelu", projector_bias=True,
                   text_hidden_size=text_hidden_size, vision_start_token_id=config.get("vision_start_token_id"),
                   vision_end_token_id=config.get("vision_end_token_id"))

    @classmethod
    def _from_gemma3(cls, config: dict[str, Any], text_hidden_size: int) -> VisionLanguageConfig:
        """The settings of a ``Gemma3ForConditionalGeneration`` ``config.json``: a SigLIP tower whose last hidden
        state is pooled to ``mm_tokens_per_image`` features (transformers' defaults where the config says none)."""
        vision = dict(config.get("vision_config") or {})
        if vision.setdefault("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"Gemma 3 vision tower {vision['model_type']!r} is not supported (SigLIP only)")
        return cls(architecture=GEMMA3, vision_config=vision,
                   image_token_id=int(config.get("image_token_id", config.get("image_token_index", 262_144))),
                   feature_layer=-1, select_strategy="full", projector_act="none", projector_bias=False,
                   text_hidden_size=text_hidden_size, tokens_per_image=int(config.get("mm_tokens_per_image", 256)),
                   begin_token_id=int(config.get("boi_token_id", config.get("boi_token_index", 255_999))),
                   end_token_id=int(config.get("eoi_token_id", config.get("eoi_token_index", 256_000))))

    @property
    def bidirectional_images(self) -> bool:
        """One image's tokens attend to each other both ways in a prompt's prefill (Gemma 3)."""
        return self.architecture == GEMMA3

    @property
    def mrope(self) -> bool:
        """Whether the model is Qwen2-VL-like: images of any size through its own vision transformer, M-RoPE."""
        return self.architecture in MROPE_ARCHITECTURES

    @property
    def merge_size(self) -> int:
        """Qwen2-VL's ``spatial_merge_size``: each token of an image stands for ``merge × merge`` patches."""
        return int(self.vision_config.get("spatial_merge_size", 2))

    def tokens_of(self, grid: tuple[int, ...]) -> int:
        """Image tokens of one image of patch grid ``grid`` (Qwen2-VL), or of any image (LLaVA: no grid)."""
        if not self.mrope:
            return self.num_image_tokens
        t, h, w = grid
        return t * h * w // (self.merge_size**2)

    @property
    def num_image_tokens(self) -> int:
        """LLaVA's image tokens per image: the tower's output positions (its patches, and CLIP's CLS position), less
        the first one under the "default" strategy (as transformers' LLaVA and its processor count them); Gemma 3's
        ``mm_tokens_per_image``. Qwen2-VL's vary per image: :meth:`tokens_of`."""
        if self.tokens_per_image is not None:
            return self.tokens_per_image
        side = self.vision_config.get("image_size", 224) // self.vision_config.get("patch_size", 32)
        has_cls = self.vision_config["model_type"] == "clip_vision_model"
        return side * side + has_cls - (self.select_strategy == "default")

    def to_dict(self) -> dict[str, Any]:
        """The record as kept in the served config (JSON types)."""
        return {"architecture": self.architecture, "vision_config": self.vision_config,
                "image_token_id": self.image_token_id,
                "feature_layer": list(self.feature_layer) if isinstance(self.feature_layer, tuple)
                else self.feature_layer,
                "select_strategy": self.select_strategy, "projector_act": self.projector_act,
                "projector_bias": self.projector_bias, "text_hidden_size": self.text_hidden_size,
                "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
                "max_image_pixels": self.max_image_pixels, "tokens_per_image": self.tokens_per_image,
                "begin_token_id": self.begin_token_id, "end_token_id": self.end_token_id}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> VisionLanguageConfig:
        layer = record["feature_layer"]
        return cls(**{**record, "feature_layer": tuple(layer) if isinstance(layer, list) else layer})


def vision_language_of(config: dict[str, Any]) -> VisionLanguageConfig | None:
    """The image settings of a served config (None: a text model)."""
    record = config.get(VISION_LANGUAGE_KEY)
    return None if record is None else VisionLanguageConfig.from_dict(record)
