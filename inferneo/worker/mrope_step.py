"""A step's M-RoPE positions (Qwen2-VL): the packed step's rotary positions of the sequences with images.

``pack_step`` writes each token's index as its rotary position, which is every token's M-RoPE position in a
sequence without images. For a sequence with images (``multimodal/mrope.py``), :func:`apply_mrope_positions`
writes ``index + delta`` into the decode rows (one position: the three equal, so decode steps, CUDA graphs
included, run as any model's) and the shifted positions of its prompt chunks' text tokens; when a chunk holds image
tokens, whose three positions differ, it returns the step's ``[3, num_tokens]`` positions for the model instead.
"""

from __future__ import annotations

import numpy as np

from inferneo.multimodal.mrope import mrope_delta, mrope_positions
from inferneo.worker.step_inputs import PackedStep, ScheduledSequence


def apply_mrope_positions(host: np.ndarray, packed: PackedStep, items: list[ScheduledSequence],
                          merge: int) -> np.ndarray | None:
    """Rewrite the positions section of ``host`` (the packed step) for the M-RoPE positions of ``items`` (the
    step's sequences) with images; returns ``[3, num_tokens]`` positions when some token's three differ, else
    None (the packed positions are then the model's). ``merge``: the vision tower's spatial merge size."""
    base = packed.layout.positions
    three: np.ndarray | None = None
    chunks: list[tuple[int, np.ndarray]] = []
    for index, it in enumerate(items):
        if not it.images:
            continue
        row = packed.first_row(index)
        start, count = it.num_computed_tokens, it.num_new_tokens
        if index < packed.num_decode_sequences and it.images[-1].end <= start:  # decoding: past every image
            host[base + row : base + row + count] += mrope_delta(it.images, merge)
            continue
        positions = mrope_positions(it.images, start, start + count, merge)
        if (positions[0] == positions[1]).all() and (positions[0] == positions[2]).all():
            host[base + row : base + row + count] = positions[0]
        else:
            chunks.append((row, positions))
    if not chunks:
        return None
    three = np.broadcast_to(host[base : base + packed.num_tokens], (3, packed.num_tokens)).copy()
    for row, positions in chunks:
        three[:, row : row + positions.shape[1]] = positions
    return three
