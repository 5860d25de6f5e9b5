"""The wide16 layout: Q4_0 / Q4_1 / Q8_0 ggml blocks transposed once at load for the AVX-512 CPU kernels.

A ggml file stores each weight row (one output column) as a run of 32-weight blocks along K. The CPU kernels want
16 output columns side by side in a 16-lane register, so with the file's layout they transpose blocks at every
call. :func:`pack_wide16` stores the same bytes the other way round: weight rows in groups of 16 (the last group
padded with zero scales and codes, which de-quantize to zero) and, for each group and block, one tile of the 16
rows' half scales, (Q4_1) their half minimums, then 256 code bytes, byte ``16 p + c`` holding row ``c``'s codes of
``k = 2p`` (low nibble) and ``k = 2p + 1`` (high nibble); for Q8_0 the half scales then 512 code bytes, byte
``32 p + c`` holding row ``c``'s signed code of ``k = 2p`` and byte ``32 p + 16 + c`` that of ``k = 2p + 1``. The tile
is exactly the 16 blocks' bytes, so the layer's
memory does not grow (except the padding of a last partial group). ``csrc/gguf_packed.cpp`` multiplies it;
:func:`unpack_wide16` restores the file's blocks bit for bit (for de-quantized copies and the reference path).
"""

from __future__ import annotations

import functools

import torch

from inferneo.quantization.gguf_blocks import block_format

#: ggml types with a wide16 layout, and the bytes of a block's scale fields in front of its 16 code bytes
WIDE16_SCALE_BYTES = {2: 2, 3: 4, 8: 2}  # Q4_0: d; Q4_1: d, m; Q8_0: d
_Q8_0 = 8
GROUP_ROWS = 16


def wide16_supported(qtype: int) -> bool:
    """Whether blocks of ggml type ``qtype`` can be held in the wide16 layout."""
    return qtype in WIDE16_SCALE_BYTES


def pack_wide16(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """ggml blocks ``uint8 [N, K / 32 * block_bytes]`` -> wide16 tiles ``uint8 [ceil(N / 16), K / 32, tile]``."""
    if not wide16_supported(qtype):
        raise ValueError(f"ggml type {qtype} has no wide16 layout (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)")
    fmt = block_format(qtype)
    rows, nb = blocks.shape[0], blocks.shape[1] // fmt.type_size
    groups = -(-rows // GROUP_ROWS)
    padded = torch.zeros(groups * GROUP_ROWS, nb, fmt.type_size, dtype=torch.uint8, device=blocks.device)
    padded[:rows] = blocks.reshape(rows, nb, fmt.type_size)
    by_group = padded.view(groups, GROUP_ROWS, nb, fmt.type_size).transpose(1, 2)  # [G, nb, 16 rows, block bytes]
    scale_bytes = WIDE16_SCALE_BYTES[qtype]
    fields = [by_group[..., s : s + 2].reshape(groups, nb, 2 * GROUP_ROWS) for s in range(0, scale_bytes, 2)]
    qs = by_group[..., scale_bytes:]
    if qtype == _Q8_0:  # [G, nb, 16 rows, 32 codes] -> [G, nb, pair p, k even/odd, row c]
        code_bytes = qs.reshape(groups, nb, GROUP_ROWS, 16, 2).permute(0, 1, 3, 4, 2)
        return torch.cat([*fields, code_bytes.reshape(groups, nb, 32 * GROUP_ROWS)], dim=-1).contiguous()
    # [G, nb, 16 rows, 16]: weight j in the low nibble of byte j, j + 16 in the high
    codes = torch.cat([qs & 15, qs >> 4], dim=-1)  # [G, nb, 16 rows, 32]: code of k
    pairs = codes.view(groups, nb, GROUP_ROWS, 16, 2)  # [G, nb, row c, pair p, k even/odd]
    code_bytes = (pairs[..., 0] | (pairs[..., 1] << 4)).transpose(2, 3)  # [G, nb, p, c]
    return torch.cat([*fields, code_bytes.reshape(groups, nb, 16 * GROUP_ROWS)], dim=-1).contiguous()


def unpack_wide16(packed: torch.Tensor, qtype: int, rows: int) -> torch.Tensor:
    """The inverse of :func:`pack_wide16`: the first ``rows`` weight rows as ggml blocks ``uint8 [rows, row_bytes]``."""
    if not wide16_supported(qtype):
        raise ValueError(f"ggml type {qtype} has no wide16 layout (Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)")
    groups, nb, _ = packed.shape
    scale_bytes = WIDE16_SCALE_BYTES[qtype]
    field_bytes = scale_bytes * GROUP_ROWS  # the tile's half scales (and minimums): 2 bytes a row each
    fields = [packed[..., s : s + 2 * GROUP_ROWS].reshape(groups, nb, GROUP_ROWS, 2)
              for s in range(0, field_bytes, 2 * GROUP_ROWS)]
    if qtype == _Q8_0:  # [G, nb, p, k even/odd, c] -> [G, nb, c, 32 codes]
        qs = packed[..., field_bytes:].reshape(groups, nb, 16, 2, GROUP_ROWS).permute(0, 1, 4, 2, 3)
        qs = qs.reshape(groups, nb, GROUP_ROWS, 32)
    else:
        code_bytes = packed[..., field_bytes:].reshape(groups, nb, 16, GROUP_ROWS).transpose(2, 3)  # [G, nb, c, p]
        codes = torch.stack([code_bytes & 15, code_bytes >> 4], dim=-1).reshape(groups, nb, GROUP_ROWS, 32)
        qs = codes[..., :16] | (codes[..., 16:] << 4)
    blocks = torch.cat([*fields, qs], dim=-1)  # [G, nb, 16 rows, block bytes]
    return blocks.transpose(1, 2).reshape(groups * GROUP_ROWS, -1)[:rows].contiguous()


@functools.cache
def _q8_0_row_bytes(device: torch.device) -> torch.Tensor:
    """``[16, 34]``: where row ``c`` of a Q8_0 tile keeps its block's bytes, in the file's order: the half scale
    (bytes ``2c``, ``2c + 1``), then the codes of ``k = 2p + h`` at ``32 + 32p + 16h + c``."""
    col = torch.arange(GROUP_ROWS, device=device).view(-1, 1)
    k = torch.arange(32, device=device)
    scale = torch.arange(2, device=device) + 2 * col
    codes = 32 + 32 * (k // 2) + 16 * (k % 2) + col
    return torch.cat([scale, codes], dim=1)


def wide16_rows(packed: torch.Tensor, qtype: int, ids: torch.Tensor) -> torch.Tensor:
    """Weight rows ``ids`` of Q8_0 wide16 tiles as the file's ggml blocks ``uint8 [len(ids), row_bytes]`` (an
    embedding lookup on tiles that an LM head multiplies): a gather of each row's scale and code bytes, no
    arithmetic, so the blocks equal the file's."""
    if qtype != _Q8_0:
        raise ValueError(f"wide16_rows reads Q8_0 tiles (ggml type 8), not type {qtype}")
    nb = packed.shape[1]
    index = _q8_0_row_bytes(packed.device)[ids % GROUP_ROWS].unsqueeze(1).expand(-1, nb, -1)  # [T, nb, 34]
    return torch.gather(packed[ids // GROUP_ROWS], 2, index).reshape(ids.numel(), nb * 34)
