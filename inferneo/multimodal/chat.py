"""Images in chat messages: OpenAI's ``image_url`` content parts.

A message's content parts are flattened into one string for the chat template (text parts joined by newlines, as
before); each image part leaves :data:`IMAGE_MARK` at its place and its URL in the message's ``images`` list.
:func:`take_images` then turns the marks into the model's image placeholder (LLaVA's ``<image>``) and hands back
the images in conversation order, for ``ImagePrompts.prepare``.
"""

from __future__ import annotations

from typing import Any

# Where an image part was, in a flattened message (a private-use character: no tokenizer gives it meaning).
IMAGE_MARK = "\ue000"
IMAGES_KEY = "images"


def image_part_url(part: dict[str, Any], at: str) -> Any:
    """The image of an OpenAI ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` part (or of
    vLLM's offline ``{"type": "image_pil", "image_pil": image}``); ValueError naming ``at`` for another shape."""
    if part.get("type") == "image_pil" and set(part) == {"type", "image_pil"}:
        return part["image_pil"]
    value = part.get("image_url")
    if set(part) != {"type", "image_url"} or not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise ValueError(f"{at}: an image part is {{'type': 'image_url', 'image_url': {{'url': str}}}}")
    if not set(value) <= {"url", "detail"}:
        raise ValueError(f"{at}: unrecognized key {sorted(set(value) - {'url', 'detail'})[0][:40]!r} in image_url")
    if value.get("detail", "auto") not in ("auto", "low", "high"):
        raise ValueError(f"{at}: image_url.detail must be 'auto', 'low' or 'high'")
    return value["url"]


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image_pil")


def take_images(conversation: list[dict[str, Any]], placeholder: str | None
                ) -> tuple[list[dict[str, Any]], list[Any]]:
    """``conversation`` for the chat template (each image mark replaced by ``placeholder``, the ``images`` lists
    removed) and its images in order. ValueError when it has images and the model takes none (``placeholder``
    None)."""
    images: list[Any] = []
    rendered = []
    for message in conversation:
        found = message.get(IMAGES_KEY)
        if not found:
            rendered.append(message)
            continue
        if placeholder is None:
            raise ValueError("this model takes text only: it cannot read images")
        images.extend(found)
        message = {k: v for k, v in message.items() if k != IMAGES_KEY}
        message["content"] = message["content"].replace(IMAGE_MARK, placeholder)
        rendered.append(message)
    return rendered, images
