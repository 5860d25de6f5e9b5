"""What a vision-language checkpoint says about its images, read from its ``config.json``.

The engine serves such a checkpoint as its language model (``hf_files.hf_config`` hands over the ``text_config``,
completed with transformers' defaults) with this record beside it, under the key :data:`VISION_LANGUAGE_KEY`: the
vision tower's config, the token that stands for image features in a prompt, how many of them one image becomes,
and how the tower's hidden states become those features (LLaVA's ``vision_feature_layer`` and
``vision_feature_select_strategy``, the projector's activation and bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VISION_LANGUAGE_KEY = "inferneo_vision_language"

# The vision-language architectures served with images, and the vision towers they may have (transformers'
# ``model_type`` of ``vision_config``).
VISION_LANGUAGE_ARCHITECTURES = ("LlavaForConditionalGeneration",)
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

    @classmethod
    def from_hf(cls, config: dict[str, Any], text_hidden_size: int) -> VisionLanguageConfig:
        """The settings of a ``LlavaForConditionalGeneration`` ``config.json`` (transformers' defaults where it
        says nothing); ValueError for a vision tower or feature choice this engine does not serve."""
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

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the tower's output positions (its patches, and CLIP's CLS position), less the
        first one under the "default" strategy (as transformers' LLaVA and its processor count them)."""
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
                "projector_bias": self.projector_bias, "text_hidden_size": self.text_hidden_size}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> VisionLanguageConfig:
        layer = record["feature_layer"]
        return cls(**{**record, "feature_layer": tuple(layer) if isinstance(layer, list) else layer})


def vision_language_of(config: dict[str, Any]) -> VisionLanguageConfig | None:
    """The image settings of a served config (None: a text model)."""
    record = config.get(VISION_LANGUAGE_KEY)
    return None if record is None else VisionLanguageConfig.from_dict(record)
