"""The front end's side of images in prompts: a prompt's image placeholders become the model's image tokens,
and its images the preprocessed pixels the core's vision tower reads.

A prompt marks where each image goes with the model's image token (LLaVA's ``<image>``), once per image, as
vLLM's prompts and the models' chat templates write it; :meth:`ImagePrompts.prepare` repeats each placeholder as
many times as the model has features per image and runs the checkpoint's own image processor (transformers'
``AutoImageProcessor``, from its ``preprocessor_config.json``) over the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferneo.multimodal.config import VisionLanguageConfig
from inferneo.multimodal.image_loading import load_image
from inferneo.multimodal.inputs import ImageInput

# The most images one prompt may hold.
MAX_IMAGES_PER_PROMPT = 16


class ImagePromptError(ValueError):
    """A prompt's images do not fit its placeholders, or an image cannot be read (the caller's error)."""


class ImagePrompts:
    """Expands a vision-language model's prompts and preprocesses their images (see the module docstring)."""

    def __init__(self, folder: Path, config: VisionLanguageConfig, tokenizer) -> None:
        from transformers import AutoImageProcessor

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: the vision-language model's image processor (preprocessor_config.json) "
                             f"could not be loaded: {exc}") from None
        self.config = config
        self.image_token_id = config.image_token_id
        self.num_image_tokens = config.num_image_tokens
        self.placeholder: str = tokenizer.convert_ids_to_tokens(self.image_token_id)

    def prepare(self, prompt_ids: list[int], images: list[Any] | None) -> tuple[list[int], list[ImageInput] | None]:
        """``prompt_ids`` with each image placeholder repeated for its image's tokens, and the images (PIL images
        or image URLs) as :class:`ImageInput` records; ``ImagePromptError`` when the placeholders and the images
        do not pair up one to one, or an image cannot be read."""
        images = images or []
        places = [i for i, token in enumerate(prompt_ids) if token == self.image_token_id]
        if len(places) != len(images):
            raise ImagePromptError(
                f"the prompt has {len(places)} image placeholder{'s' * (len(places) != 1)} ({self.placeholder}) "
                f"and {len(images)} image{'s' * (len(images) != 1)} were given: one placeholder per image")
        if not images:
            return prompt_ids, None
        if len(images) > MAX_IMAGES_PER_PROMPT:
            raise ImagePromptError(f"a prompt may hold at most {MAX_IMAGES_PER_PROMPT} images, got {len(images)}")
        try:
            pictures = [load_image(image) for image in images]
        except ValueError as exc:
            raise ImagePromptError(str(exc)) from None
        try:
            pixels = self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        except Exception as exc:  # an image the processor cannot take (too small to crop, a strange mode, ...)
            raise ImagePromptError(f"the model's image processor could not prepare the image: {exc}") from None
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        previous = 0
        for index, place in enumerate(places):
            expanded.extend(prompt_ids[previous:place])
            inputs.append(ImageInput.from_tensor(len(expanded), self.num_image_tokens, pixels[index]))
            expanded.extend([self.image_token_id] * self.num_image_tokens)
            previous = place + 1
        expanded.extend(prompt_ids[previous:])
        return expanded, inputs
