"""Tile configurations for the Triton mixture-of-experts kernels (``triton_moe.py``), per shape.

A shape is the layer's expert count ``E``, expert width ``N`` (the intermediate size ``I``), hidden size ``K`` and
dtype; its tuned configs live in ``moe_configs/E={E},N={N},K={K},dtype={dtype}.json`` as a map from a token-count
bucket to a config::

    {"1": {"block_m": 16, "up": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4},
           "down": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}}, "64": {...}}

A call with ``T`` tokens takes the smallest bucket ``>= T`` (the largest bucket past the last). Shapes without a
file take :func:`default_moe_config`. ``block_m`` (the tile height, shared by both GEMMs since the (token, expert)
pairs are padded to it) and the other block sizes are powers of two of at least 16.

The same file may hold the tiles of the few-token path under the key ``"pair"`` (a :class:`PairTiles` record;
:func:`pair_tiles`), e.g. ``"pair": {"up_block_n": 8, "up_block_k": 1024, "up_num_warps": 4, "down_block_n": 8,
"down_block_k": 256, "down_num_warps": 8}``, with optional switches of those kernels: ``up_unroll`` /
``down_unroll`` (the K loop unrolled), ``up_reduce_each`` / ``down_reduce_each`` (each K chunk summed at once) and
``evict`` (the expert weights' L2 eviction hint), 0 when absent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from inferneo import envs

CONFIG_DIR = Path(__file__).with_name("moe_configs")


@dataclass(frozen=True, slots=True)
class GemmTiles:
    """One grouped GEMM's tile width, depth and launch options."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True, slots=True)
class MoeTileConfig:
    """The tiles of both grouped GEMMs for one token-count bucket: ``up`` (gate/up + activation), ``down``."""

    block_m: int
    up: GemmTiles
    down: GemmTiles

    @classmethod
    def from_json(cls, entry: dict) -> MoeTileConfig:
        return cls(block_m=int(entry["block_m"]), up=GemmTiles(**entry["up"]), down=GemmTiles(**entry["down"]))

    def to_json(self) -> dict:
        tiles = ("block_n", "block_k", "num_warps", "num_stages")
        return {"block_m": self.block_m, "up": {t: getattr(self.up, t) for t in tiles},
                "down": {t: getattr(self.down, t) for t in tiles}}


@dataclass(frozen=True, slots=True)
class PairTiles:
    """Tiles of the few-token path (``triton_moe``'s per-pair kernels): output features per program, the K chunk and
    the warps of the gate/up kernel (one program per pair and ``up_block_n`` features) and of the down kernel (one
    program per token and ``down_block_n`` features, all ``top_k`` experts of the token at once)."""

    up_block_n: int = 8  # the defaults: the best of Qwen3-30B-A3B's layer on an H200 (moe_decode_sweep.py)
    up_block_k: int = 1024
    up_num_warps: int = 4
    down_block_n: int = 8
    down_block_k: int = 256
    down_num_warps: int = 8
    up_unroll: int = 0  # 1: the gate/up kernel's K loop unrolled (K is a compile-time constant either way)
    up_reduce_each: int = 0  # 1: the gate/up kernel sums each K chunk at once ([BLOCK_N] accumulators)
    down_unroll: int = 0  # 1: the down kernel's K loop unrolled
    evict: int = 0  # the expert weights' L2 eviction hint in both kernels: 0 normal, 1 evict_first, 2 evict_last
    down_reduce_each: int = 0  # 1: the down kernel sums each K chunk at once ([top_k, BLOCK_N] accumulators)

    @classmethod
    def from_json(cls, entry: dict) -> PairTiles:
        return cls(**{name: int(value) for name, value in entry.items()})

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def default_moe_config(num_tokens: int, top_k: int) -> MoeTileConfig:
    """A reasonable config for shapes without a tuned file: short tiles when few pairs reach each expert."""
    if num_tokens * top_k <= 512:  # decode: memory-bound, most experts see a handful of rows
        tiles = GemmTiles(block_n=64, block_k=128, num_warps=4, num_stages=4)
        return MoeTileConfig(block_m=16, up=tiles, down=tiles)
    tiles = GemmTiles(block_n=128, block_k=64, num_warps=8, num_stages=3)
    return MoeTileConfig(block_m=64, up=tiles, down=tiles)


def config_file_name(num_experts: int, intermediate_size: int, hidden_size: int, dtype: torch.dtype) -> str:
    """The file name that holds the tuned configs of one shape."""
    return f"E={num_experts},N={intermediate_size},K={hidden_size},dtype={str(dtype).removeprefix('torch.')}.json"


PAIR_KEY = "pair"
"""The key of a shape's few-token tiles in its config file (the other keys are token-count buckets)."""


@functools.cache
def _table(file_name: str) -> dict | None:
    path = CONFIG_DIR / file_name
    return json.loads(path.read_text()) if path.is_file() else None


@functools.cache
def _tuned(file_name: str) -> tuple[tuple[int, MoeTileConfig], ...] | None:
    table = _table(file_name)
    if table is None:
        return None
    return tuple(sorted((int(bucket), MoeTileConfig.from_json(entry)) for bucket, entry in table.items()
                        if bucket != PAIR_KEY))


def moe_tile_config(num_experts: int, intermediate_size: int, hidden_size: int, dtype: torch.dtype, num_tokens: int,
                    top_k: int) -> MoeTileConfig:
    """The config for ``num_tokens`` tokens through a layer of this shape: tuned when a file exists, else the
    default."""
    tuned = _tuned(config_file_name(num_experts, intermediate_size, hidden_size, dtype))
    if not tuned:
        return default_moe_config(num_tokens, top_k)
    for bucket, config in tuned:
        if num_tokens <= bucket:
            return config
    return tuned[-1][1]


def pair_tiles(num_experts: int, intermediate_size: int, hidden_size: int, dtype: torch.dtype) -> PairTiles:
    """The few-token path's tiles for a layer of this shape: the ``"pair"`` entry of its config file, else the
    defaults of :class:`PairTiles`; ``INFERNEO_MOE_EVICT``, when set, overrides the eviction hint and
    ``INFERNEO_MOE_PAIR_TILES`` any fields it names (A/B switches)."""
    table = _table(config_file_name(num_experts, intermediate_size, hidden_size, dtype))
    tiles = PairTiles() if table is None or PAIR_KEY not in table else PairTiles.from_json(table[PAIR_KEY])
    evict = envs.moe_evict()  # INFERNEO_MOE_EVICT: the eviction hint overridden (an A/B switch)
    tiles = tiles if evict is None else dataclasses.replace(tiles, evict=evict)
    return dataclasses.replace(tiles, **envs.moe_pair_tiles())  # INFERNEO_MOE_PAIR_TILES: fields overridden
