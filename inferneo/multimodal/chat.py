"""Images in chat messages: OpenAI's ``image_url`` content parts.

A message's content parts are flattened into one string for the chat template (text parts joined by newlines, as
before); each image part leaves :data:`IMAGE_MARK` at its place and its URL in the message's ``images`` list.
:func:`take_images` then turns the marks into the model's image placeholder (LLaVA's ``<image>``) and hands back
the images in conversation order, for ``ImagePrompts.prepare``.
"""

from __future__ import annotations

import functools
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


def take_images(conversation: list[dict[str, Any]], placeholder: str | None, parts: bool = False
                ) -> tuple[list[dict[str, Any]], list[Any]]:
    """``conversation`` for the chat template and its images in order. Each image mark becomes ``placeholder``
    (text), or with ``parts`` (a template that reads OpenAI-style content lists, :func:`template_reads_parts`)
    every message's content becomes a list of ``{"type": "text"}`` and ``{"type": "image"}`` parts, which such a
    template turns into its own placeholders. The ``images`` lists are removed. ValueError when the conversation
    has images and the model takes none (``placeholder`` None)."""
    images: list[Any] = []
    rendered = []
    for message in conversation:
        found = message.get(IMAGES_KEY)
        if found and placeholder is None:
            raise ValueError("this model takes text only: it cannot read images")
        if found:
            images.extend(found)
            message = {k: v for k, v in message.items() if k != IMAGES_KEY}
        content = message.get("content")
        if parts and isinstance(content, str):
            message = {**message, "content": _content_parts(content)}
        elif found:
            message = {**message, "content": content.replace(IMAGE_MARK, placeholder)}
        rendered.append(message)
    return rendered, images


def _content_parts(text: str) -> list[dict[str, Any]]:
    """A flattened content as OpenAI-style parts: the text between image marks (less the newlines that joined the
    parts) and an image part for each mark."""
    pieces = text.split(IMAGE_MARK)
    result: list[dict[str, Any]] = []
    for index, piece in enumerate(pieces):
        if index:
            result.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if index < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            result.append({"type": "text", "text": piece})
    return result


_PROBE = "\ue001probe\ue001"


def template_reads_parts(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the chat template (``chat_template``, else the tokenizer's) reads a message's content as a list of
    OpenAI-style parts (LLaVA's templates do: they loop over the parts and write their own image placeholders)
    rather than as a string: a user message of plain text leaves no trace in what it renders."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    return _reads_parts(tokenizer, template)


@functools.lru_cache(maxsize=16)
def _reads_parts(tokenizer, template: str) -> bool:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             chat_template=template, add_generation_prompt=False)
    except Exception:  # a template that refuses the probe renders strings, as before
        return False
    return _PROBE not in text
