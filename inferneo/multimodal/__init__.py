"""Images in prompts: what crosses to the engine core (:mod:`.inputs`), the vision-language settings read from a
checkpoint (:mod:`.config`), and the front end's side: reading images and turning a prompt's image placeholders
into the model's image tokens (:mod:`.prompts`)."""

from inferneo.multimodal.config import VisionLanguageConfig
from inferneo.multimodal.inputs import ImageInput

__all__ = ["ImageInput", "VisionLanguageConfig"]
