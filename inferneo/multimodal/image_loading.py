"""Reading the images users send: PIL images as they are, and OpenAI's ``image_url`` values (``data:`` URLs
with base64 bytes, ``http(s)`` URLs fetched with a time and size limit, and ``file://`` URLs of files under the
folder ``--allowed-local-media-path`` names). Every failure is a ``ValueError``
whose message says what was wrong with the image, for a 400."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from pathlib import Path
from typing import Any

# The most bytes an image may have, fetched or inline (OpenAI takes images of up to 20 MB).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
FETCH_TIMEOUT_S = 10.0
# The most pixels a decoded image may have (a small compressed file can declare a huge picture).
MAX_IMAGE_PIXELS = 40_000_000


def load_image(source: Any, local_media: Path | None = None) -> Any:
    """``source`` (a ``PIL.Image.Image``, a ``data:image/...;base64,`` URL, an ``http(s)`` URL, or a ``file://`` URL
    of a file under ``local_media``, when given) as an RGB PIL image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, str):
        raise ValueError(f"an image must be a PIL image or a URL string, got {type(source).__name__}")
    if source.startswith("data:"):
        data = _data_url_bytes(source)
    elif source.startswith(("http://", "https://")):
        data = _fetch(source)
    elif source.startswith("file://") and local_media is not None:
        data = _local_file(source, local_media)
    else:
        allowed = ", file:// URLs under the server's allowed folder" if local_media is not None else ""
        raise ValueError(f"image URL {source[:60]!r}: only data: URLs (base64) and http(s) URLs{allowed} are "
                         "supported" + ("" if local_media is not None else
                                        " (file:// URLs need --allowed-local-media-path)"))
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


def _local_file(url: str, root: Path) -> bytes:
    """The bytes of a ``file://`` URL's file, which must lie under ``root`` once links are resolved."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"image URL {url[:80]!r}: a file:// URL names a file of this machine (no host)")
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise ValueError(f"image URL {url[:80]!r} is not a file under the folder the server reads images from")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image {url[:80]!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return path.read_bytes()


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
