"""Gemma 3's image half (``Gemma3ForConditionalGeneration``): a SigLIP vision tower whose last hidden state is
average-pooled to ``mm_tokens_per_image`` positions, RMS-normed and projected to the language model's width.

The tower and the projector are transformers' own modules (``SiglipVisionModel`` and
``Gemma3MultiModalProjector``), built from the checkpoint's config and run as they are; the rest (weight names of
transformers 4 and 5, the language model) is :class:`~inferneo.model_executor.models.llava.VisionLanguageModel`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from inferneo.attention.backend import AttentionFeature
from inferneo.model_executor.models.llava import VisionLanguageModel


class Gemma3VisionLanguageModel(VisionLanguageModel):
    """The image half of Gemma 3 (see the module docstring), placed before ``Gemma3ForCausalLM`` by
    ``vision_language_class``. In a prompt's prefill the tokens of one image attend to each other both ways
    (transformers' Gemma 3 with ``token_type_ids``): the runner marks each image's rows for the attention
    backend (``AttentionMetadata.image_blocks``), and the scheduler keeps each image whole in one step."""

    bidirectional_images = True

    def attention_features(self) -> frozenset[AttentionFeature]:
        """The backend must let an image's rows see the whole image (the PyTorch backend does)."""
        return frozenset({AttentionFeature.IMAGE_BLOCKS})

    def build_projector(self) -> nn.Module:
        """transformers' ``Gemma3MultiModalProjector`` of the checkpoint's vision config and token count."""
        from transformers import Gemma3Config
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        config = self.vision_language
        vision = {k: v for k, v in config.vision_config.items() if k != "model_type"}
        return Gemma3MultiModalProjector(Gemma3Config(vision_config=vision,
                                                      text_config={"hidden_size": config.text_hidden_size},
                                                      mm_tokens_per_image=config.num_image_tokens))

    def encode_image(self, pixels: torch.Tensor, grid: tuple[int, ...] = ()) -> torch.Tensor:
        """The features ``[mm_tokens_per_image, hidden]`` of one preprocessed image ``pixels`` (``[3, H, W]`` or
        ``[1, 3, H, W]``), in the model's dtype, as transformers' ``Gemma3Model.get_image_features`` computes them
        (``grid``: unused, the images are of one size)."""
        weight = next(self.vision_tower.parameters())
        pixels = pixels.to(device=weight.device, dtype=weight.dtype)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        features = self.multi_modal_projector(self.vision_tower(pixel_values=pixels).last_hidden_state)[0]
        if features.shape[0] != self.num_image_tokens:
            raise ValueError(f"an image gave {features.shape[0]} features where the model takes "
                             f"{self.num_image_tokens} image tokens (pixels of shape {tuple(pixels.shape)})")
        return features
