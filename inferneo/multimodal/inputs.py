"""An image of a prompt as it crosses from the front end to the engine core: preprocessed pixels, where its tokens
sit in the prompt, and a digest of its pixels (prefix-cache blocks that hold an image's tokens are keyed by it)."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import torch


class ImageInput(msgspec.Struct, array_like=True, frozen=True):
    """One image of a prompt: its ``length`` image tokens start at prompt position ``offset``; ``pixels`` are the
    image processor's output for it (``shape``, float32, C order), what the vision tower reads. ``grid``: a
    Qwen2-VL image's patch grid (temporal, height, width), which its vision tower reads and its tokens' M-RoPE
    positions follow; empty for a model of fixed-size images (LLaVA)."""

    offset: int
    length: int
    pixels: bytes
    shape: tuple[int, ...]
    digest: str  # sha256 of the pixels and their shape: the same picture, preprocessed the same way
    grid: tuple[int, ...] = ()

    @classmethod
    def from_tensor(cls, offset: int, length: int, pixels: torch.Tensor, grid: tuple[int, ...] = ()) -> ImageInput:
        """The image whose preprocessed pixels are ``pixels`` (any float dtype; sent as float32), of patch grid
        ``grid`` (Qwen2-VL's; empty otherwise)."""
        array = np.ascontiguousarray(pixels.detach().to(torch.float32).cpu().numpy())
        data = array.tobytes()
        digest = hashlib.sha256(repr(array.shape).encode() + repr(tuple(grid)).encode() * bool(grid)
                                + data).hexdigest()
        return cls(offset, length, data, tuple(array.shape), digest, tuple(int(n) for n in grid))

    def tensor(self) -> torch.Tensor:
        """The pixels as a float32 tensor of ``shape`` (a copy: the bytes stay read-only)."""
        return torch.from_numpy(np.frombuffer(self.pixels, dtype=np.float32).copy()).reshape(self.shape)

    @property
    def end(self) -> int:
        """The prompt position after its last image token."""
        return self.offset + self.length


def images_in(images: list[ImageInput] | None, start: int, stop: int) -> tuple[str, ...]:
    """The digests of the images with a token in prompt positions ``[start, stop)`` (in prompt order)."""
    if not images:
        return ()
    return tuple(image.digest for image in images if image.offset < stop and image.end > start)
