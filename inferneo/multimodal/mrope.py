"""Qwen2-VL's M-RoPE positions: each token's (temporal, height, width) rotary positions, from its prompt's images.

A text token's three positions are equal. An image of ``t × h × w`` merged patches (its patch grid over
``spatial_merge_size`` in height and width), whose first token would sit at position ``s``, gives its tokens the
grid positions ``(s + i, s + j, s + k)`` in row-major order; the text after it continues at ``s + max(h, w)``
(as transformers' ``get_rope_index`` numbers them). So every token after an image sits ``shift`` positions off its
index, where each image adds ``max(h, w) - t*h*w`` to the shift; the tokens generated after the prompt sit at
``index + delta``, ``delta`` being the shift after the last image (transformers' ``rope_deltas``).

The positions are a function of a token's index and its sequence's images alone, so the runner computes them for
any span of a sequence (a prompt chunk, a prefix-cache hit's remainder, a recomputed sequence) from the
:class:`~inferneo.multimodal.inputs.ImageInput` records it already holds.
"""

from __future__ import annotations

import numpy as np

from inferneo.multimodal.inputs import ImageInput


def merged_grid(image: ImageInput, merge: int) -> tuple[int, int, int]:
    """An image's grid of language-model tokens: its patch grid with height and width over ``merge``."""
    t, h, w = image.grid
    return t, h // merge, w // merge


def image_shift(image: ImageInput, merge: int) -> int:
    """How far the tokens after ``image`` sit from their index, more than the tokens before it."""
    t, h, w = merged_grid(image, merge)
    return max(h, w) - t * h * w


def mrope_delta(images: list[ImageInput] | None, merge: int) -> int:
    """``position - index`` of the tokens after all of a sequence's images (its generated tokens)."""
    return sum(image_shift(image, merge) for image in images or ())


def mrope_positions(images: list[ImageInput] | None, start: int, stop: int, merge: int) -> np.ndarray:
    """The M-RoPE positions ``[3, stop - start]`` (int64) of a sequence's tokens ``[start, stop)``; ``images`` in
    prompt order."""
    index = np.arange(start, stop, dtype=np.int64)
    positions = np.broadcast_to(index, (3, stop - start)).copy()
    shift = 0
    for image in images or ():
        t, h, w = merged_grid(image, merge)
        if image.length != t * h * w:
            raise ValueError(f"an image of grid {image.grid} (merge {merge}) has {image.length} tokens, not "
                             f"{t * h * w}")
        lo, hi = max(image.offset, start), min(image.end, stop)
        if lo < hi:
            first = image.offset + shift
            cells = np.arange(lo - image.offset, hi - image.offset)
            columns = slice(lo - start, hi - start)
            positions[0, columns] = first + cells // (h * w)
            positions[1, columns] = first + (cells // w) % h
            positions[2, columns] = first + cells % w
        shift += max(h, w) - t * h * w
        after = max(image.end, start)
        if after < stop:
            positions[:, after - start :] = index[after - start :] + shift
    return positions
