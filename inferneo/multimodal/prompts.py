"""The front end's side of images in prompts: a prompt's image placeholders become the model's image tokens,
and its images the preprocessed pixels the core's vision tower reads.

A prompt marks where each image goes with the model's image token (LLaVA's ``<image>``, Qwen2-VL's
``<|image_pad|>``), once per image, as vLLM's prompts and the models' chat templates write it;
:meth:`ImagePrompts.prepare` runs the checkpoint's own image processor (transformers' ``AutoImageProcessor``, from
its ``preprocessor_config.json``) over the images and repeats each placeholder as many times as the model has
features for that image (a fixed count for LLaVA; for Qwen2-VL, the image's patch grid over the merge size
squared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferneo.multimodal.config import VisionLanguageConfig
from inferneo.multimodal.image_loading import load_image
from inferneo.multimodal.inputs import ImageInput
from inferneo.multimodal.limits import DEFAULT_MAX_IMAGES


class ImagePromptError(ValueError):
    """A prompt's images do not fit its placeholders, or an image cannot be read (the caller's error)."""


class ImagePrompts:
    """Expands a vision-language model's prompts and preprocesses their images (see the module docstring)."""

    def __init__(self, folder: Path, config: VisionLanguageConfig, tokenizer, max_images: int = DEFAULT_MAX_IMAGES,
                 local_media: Path | None = None) -> None:
        """``max_images``: the most images one prompt may hold (``limit_mm_per_prompt``); ``local_media``: the
        folder whose images ``file://`` URLs may name (``allowed_local_media_path``; None: such URLs are refused)."""
        from transformers import AutoImageProcessor

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: the vision-language model's image processor (preprocessor_config.json) "
                             f"could not be loaded: {exc}") from None
        self.config = config
        self.max_images = max_images
        self.local_media = local_media
        self.image_token_id = config.image_token_id
        # The token a prompt writes per image, and what it becomes: LLaVA's and Qwen2-VL's image token, repeated;
        # Gemma 3's begin-of-image token, as its processor expands it: "\n\n", begin, the image tokens, end, "\n\n".
        self.placeholder_id = self.image_token_id if config.begin_token_id is None else config.begin_token_id
        self.placeholder: str = tokenizer.convert_ids_to_tokens(self.placeholder_id)
        self.before: list[int] = []
        self.after: list[int] = []
        if config.begin_token_id is not None and config.end_token_id is not None:
            newlines = list(tokenizer.encode("\n\n", add_special_tokens=False))
            self.before = newlines + [config.begin_token_id]
            self.after = [config.end_token_id] + newlines
        # What a chat message's image becomes in a template that reads strings: the placeholder, which Qwen2-VL
        # wraps in its vision markers (as its own template writes an image part)
        self.chat_placeholder = self.placeholder
        if config.vision_start_token_id is not None and config.vision_end_token_id is not None:
            start, end = tokenizer.convert_ids_to_tokens([config.vision_start_token_id, config.vision_end_token_id])
            self.chat_placeholder = f"{start}{self.placeholder}{end}"

    def prepare(self, prompt_ids: list[int], images: list[Any] | None) -> tuple[list[int], list[ImageInput] | None]:
        """``prompt_ids`` with each image placeholder repeated for its image's tokens, and the images (PIL images
        or image URLs) as :class:`ImageInput` records; ``ImagePromptError`` when the placeholders and the images
        do not pair up one to one, or an image cannot be read."""
        images = images or []
        places = [i for i, token in enumerate(prompt_ids) if token == self.placeholder_id]
        if len(places) != len(images):
            raise ImagePromptError(
                f"the prompt has {len(places)} image placeholder{'s' * (len(places) != 1)} ({self.placeholder}) "
                f"and {len(images)} image{'s' * (len(images) != 1)} were given: one placeholder per image")
        if not images:
            return prompt_ids, None
        if len(images) > self.max_images:
            raise ImagePromptError(f"a prompt may hold at most {self.max_images} image"
                                   f"{'s' * (self.max_images != 1)} here (limit_mm_per_prompt), got {len(images)}")
        try:
            pictures = [load_image(image, self.local_media) for image in images]
        except ValueError as exc:
            raise ImagePromptError(str(exc)) from None
        try:
            processed = self.image_processor(images=pictures, return_tensors="pt")
        except Exception as exc:  # an image the processor cannot take (too small to crop, a strange mode, ...)
            raise ImagePromptError(f"the model's image processor could not prepare the image: {exc}") from None
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        previous = 0
        for place, (pixels, grid) in zip(places, self._per_image(processed), strict=True):
            expanded.extend(prompt_ids[previous:place])
            expanded.extend(self.before)
            count = self.config.tokens_of(grid)
            inputs.append(ImageInput.from_tensor(len(expanded), count, pixels, grid))
            expanded.extend([self.image_token_id] * count)
            expanded.extend(self.after)
            previous = place + 1
        expanded.extend(prompt_ids[previous:])
        return expanded, inputs

    def _per_image(self, processed) -> list[tuple[Any, tuple[int, ...]]]:
        """Each image's pixels and patch grid from the image processor's output: Qwen2-VL's flattened patches of
        all the images, split by their ``image_grid_thw``; a LLaVA processor's ``[images, 3, H, W]`` (no grid)."""
        pixels = processed["pixel_values"]
        if not self.config.mrope:
            return [(image, ()) for image in pixels]
        grids = [tuple(int(n) for n in grid) for grid in processed["image_grid_thw"].tolist()]
        return list(zip(pixels.split([t * h * w for t, h, w in grids]), grids, strict=True))
