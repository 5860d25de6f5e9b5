"""Reading the images users send: PIL images as they are, and OpenAI's ``image_url`` values (``data:`` URLs
with base64 bytes, or ``http(s)`` URLs fetched with a time and size limit). Every failure is a ``ValueError``
whose message says what was wrong with the image, for a 400."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

# The most bytes an image may have, fetched or inline (OpenAI takes images of up to 20 MB).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT_S = 10.0
# The most pixels a decoded image may have (a small compressed file can declare a huge picture).
MAX_IMAGE_PIXELS = 40_000_000


def load_image(source: Any) -> Any:
    """``source`` (a ``PIL.Image.Image``, a ``data:image/...;base64,`` URL, or an ``http(s)`` URL) as an RGB PIL
    image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, str):
        raise ValueError(f"an image must be a PIL image or a URL string, got {type(source).__name__}")
    if source.startswith("data:"):
        data = _data_url_bytes(source)
    elif source.startswith(("http://", "https://")):
        data = _fetch(source)
    else:
        raise ValueError(f"image URL {source[:60]!r}: only data: URLs (base64) and http(s) URLs are supported")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:  # read from the header, before any pixel is decoded
                raise ValueError(f"the image has {image.width}x{image.height} pixels; at most "
                                 f"{MAX_IMAGE_PIXELS // 10**6} million are read")
            return image.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # PIL raises several kinds for bytes that are not an image
        raise ValueError(f"the image could not be decoded: {exc}") from None


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("an image data URL must be base64: data:image/<type>;base64,<data>")
    if not header.startswith("data:image/"):
        raise ValueError(f"a data URL of {header[5:].removesuffix(';base64')!r} is not an image")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL is not valid base64") from None


def _fetch(url: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ValueError(f"fetching image {url[:80]!r} gave HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise ValueError(f"image {url[:80]!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ValueError(f"fetching image {url[:80]!r} failed: {exc}") from None
