"""Qwen2-VL and Qwen2.5-VL: transformers' own vision transformer in front of the engine's Qwen2 with M-RoPE.

A checkpoint is served as ``Qwen2ForCausalLM`` (``hf_files`` hands over its language model's config, whose
``mrope_section`` makes the rotary layers M-RoPE) with images: :func:`qwen_vl_class` makes that class into one that
also holds the checkpoint's vision transformer (``Qwen2VisionTransformerPretrainedModel`` or
``Qwen2_5_VisionTransformerPretrainedModel``, run as it is, its patch merger included). The runner asks it for
each image's features (:meth:`QwenVisionLanguageModel.encode_image`, from the image processor's flattened patches
and the image's patch grid) and gives the image tokens their 3D positions (``multimodal/mrope.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from inferneo.model_executor.models.llava import built_on, load_module_weights
from inferneo.multimodal.config import VisionLanguageConfig

# Checkpoint name prefixes of the language model (transformers 5 nests it; transformers 4 wrote ``model.*``).
_LANGUAGE_MODEL_PREFIXES = (("model.language_model.", "model."),)
_VISION_PREFIXES = ("model.visual.", "visual.")


def _vision_transformer(config: VisionLanguageConfig) -> nn.Module:
    """transformers' vision transformer of the checkpoint's ``vision_config`` (weights loaded later)."""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    values = {k: v for k, v in config.vision_config.items() if k not in ("model_type", "architectures")}
    if config.architecture == "Qwen2_5_VLForConditionalGeneration":
        return Qwen2_5_VisionTransformerPretrainedModel(transformers.Qwen2_5_VLVisionConfig(**values))
    return Qwen2VisionTransformerPretrainedModel(transformers.Qwen2VLVisionConfig(**values))


class QwenVisionLanguageModel:
    """The image half of Qwen2-VL, placed before its language model class (see :func:`qwen_vl_class`)."""

    vision_language: VisionLanguageConfig  # set on each class qwen_vl_class makes
    accepts_images = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_vision_half()

    def _build_vision_half(self) -> None:
        self.visual = _vision_transformer(self.vision_language)
        for linear in self.visual.modules():
            if isinstance(linear, nn.Linear):  # transformers' modules run as they are: no packed CPU copy
                linear.quantizable = False
                linear.packable = False

    def materialized(self, device: torch.device) -> None:
        """After ``tensor_parallel.materialize``: the vision transformer built again on ``device``, its buffers
        (rotary frequencies) computed, not left as the uninitialized storage a meta model gets."""
        with built_on(device, self.embed_tokens.weight.dtype):
            self._build_vision_half()

    @property
    def image_token_id(self) -> int:
        return self.vision_language.image_token_id

    @property
    def mrope_merge_size(self) -> int:
        """The vision transformer's ``spatial_merge_size``, which the runner's M-RoPE positions read."""
        return self.vision_language.merge_size

    def blank_image(self, device: torch.device | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The flattened patches and grid of a blank image as large as the image processor leaves any (the
        checkpoint's ``max_pixels``, square; eight tokens a side when unknown), for memory profiling."""
        config = self.vision_language
        vision, merge = config.vision_config, self.mrope_merge_size
        patch = vision.get("patch_size", 14)
        tokens = 8
        if config.max_image_pixels:
            tokens = max(1, math.isqrt(config.max_image_pixels) // (patch * merge))
        side = tokens * merge
        width = vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2) * patch**2
        return torch.zeros(side * side, width, device=device), (1, side, side)

    def encode_image(self, pixels: torch.Tensor, grid: tuple[int, ...] = ()) -> torch.Tensor:
        """The features ``[tokens, hidden]`` of one image: the image processor's flattened patches ``pixels``
        (``[t*h*w, C * temporal_patch * patch²]``) of patch grid ``grid`` (t, h, w), as transformers computes
        them."""
        if len(grid) != 3:
            raise ValueError(f"a Qwen2-VL image needs its patch grid (t, h, w); got {grid!r}")
        weight = next(self.visual.parameters())
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        grid_thw = torch.tensor([list(grid)], dtype=torch.int64, device=weight.device)
        features = self.visual(pixels, grid_thw=grid_thw).pooler_output
        expected = self.vision_language.tokens_of(grid)
        if features.shape[0] != expected:
            raise ValueError(f"an image of grid {grid} gave {features.shape[0]} features, not {expected}")
        return features

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """The vision transformer's tensors into it (every one required, as ``strict`` asks of the language
        model's), the language model's under its text-only names through its own loader."""
        vision: dict[str, torch.Tensor] = {}

        def language_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(_VISION_PREFIXES):
                    vision[name.split("visual.", 1)[1]] = tensor
                    continue
                for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
                    if name.startswith(prefix):
                        name = replacement + name.removeprefix(prefix)
                        break
                yield name, tensor

        loaded = super().load_weights(language_weights(), strict)
        load_module_weights(self.visual, vision, "visual", strict)
        return loaded | {f"visual.{name}" for name in vision}

    def expected_weight_keys(self, pname: str, param: torch.Tensor) -> list[str]:
        """The language model's load keys (the vision transformer's are checked by ``load_module_weights``)."""
        if pname.startswith("visual."):
            return []
        return super().expected_weight_keys(pname, param)

    def cast(self, dtype: torch.dtype) -> None:
        super().cast(dtype)
        self.visual.to(dtype=dtype)


def qwen_vl_class(language_model: type[nn.Module], config: VisionLanguageConfig) -> type[nn.Module]:
    """``language_model``'s class (Qwen2's) made to take images as ``config`` says (see the module docstring)."""
    if getattr(language_model, "forward", None) is None or not hasattr(language_model, "embed"):
        raise ValueError(f"{config.architecture}: its language model {language_model.__name__} cannot take images")
    return type(f"QwenVL{language_model.__name__}", (QwenVisionLanguageModel, language_model),
                {"vision_language": config, "__module__": __name__})
