"""The Triton fused mixture-of-experts kernels against a plain per-expert PyTorch reference, run on CPU under
Triton's interpreter in a subprocess (the interpreter must be on before triton is imported); the tile-config lookup;
the device transform's hook."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from inferneo.kernels import moe_tile_configs
from inferneo.kernels.moe_tile_configs import (
    GemmTiles,
    MoeTileConfig,
    PairTiles,
    default_moe_config,
    moe_tile_config,
    pair_tiles,
)

_TESTS = Path(__file__).parent

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import triton  # noqa: F401  (under TRITON_INTERPRET=1)
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from moe_reference import reference_experts
    from inferneo.kernels import triton_moe
    from inferneo.kernels.moe_tile_configs import GemmTiles, MoeTileConfig
    from inferneo.model_executor.layers.moe import fused_experts
    from inferneo.model_executor.layers.moe_routing import softmax_topk_renormalized

    SMALL = MoeTileConfig(block_m=16, up=GemmTiles(block_n=16, block_k=16), down=GemmTiles(block_n=32, block_k=16))

    def check_blocks(blocks, ids, num_experts):
        # every pair exactly once, in a block of its own expert; padding rows hold num_pairs
        flat = ids.reshape(-1)
        pairs = blocks.sorted_pairs.long()
        real = pairs < flat.numel()
        assert sorted(pairs[real].tolist()) == list(range(flat.numel()))
        block_of_row = torch.arange(pairs.numel()) // blocks.block_m
        assert torch.equal(flat[pairs[real]], blocks.block_experts.long()[block_of_row[real]])
        used = blocks.block_experts >= 0
        assert not used[int(used.sum()):].any()  # the unused blocks are at the end
        want = sum(-(-int(c) // blocks.block_m) for c in torch.bincount(flat, minlength=num_experts))
        assert int(used.sum()) == want

    # Align: the one-program kernel and the sort path give the same grouping.
    for num_experts, tokens, top_k, block_m in ((4, 1, 1, 16), (8, 3, 8, 16), (6, 40, 2, 16), (128, 9, 8, 32),
                                                (5, 70, 3, 64)):
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
        ids[: tokens // 2, 0] = 0  # uneven
        bound = triton_moe.max_blocks(ids.numel(), num_experts, block_m)
        one = triton_moe._align_single_program(ids.reshape(-1), num_experts, block_m, bound)
        sort = triton_moe._align_by_sort(ids.reshape(-1), num_experts, block_m, bound)
        check_blocks(one, ids, num_experts)
        check_blocks(sort, ids, num_experts)
        assert torch.equal(one.block_experts, sort.block_experts)
        assert torch.equal(one.sorted_pairs, sort.sorted_pairs)

    # The kernels: uneven loads, an empty expert, top-k 1..8, both activations, biases, 1 / a few / many tokens.
    torch.manual_seed(0)
    num_experts, hidden, inter = 9, 40, 24  # widths that are not multiples of the tiles
    cases = []
    for top_k in range(1, 9):
        for tokens in (1, 5, 37):
            activation = ("silu", "swigluoai")[(top_k + tokens) % 2]
            bias = (top_k + tokens // 5) % 2 == 1
            cases.append((top_k, tokens, activation, bias))
    cases += [(2, 37, "silu", True), (2, 37, "swigluoai", False), (1, 37, "swigluoai", True)]
    for top_k, tokens, activation, bias in cases:
        x = torch.randn(tokens, hidden) * 2
        w13 = torch.randn(num_experts, 2 * inter, hidden) * 0.3
        w2 = torch.randn(num_experts, hidden, inter) * 0.3
        b13 = torch.randn(num_experts, 2 * inter) if bias else None
        b2 = torch.randn(num_experts, hidden) if bias else None
        logits = torch.randn(tokens, num_experts)
        logits[:, 0] += 4.0  # expert 0 takes most tokens
        logits[:, num_experts - 1] = -1e4  # the last expert none
        routed = softmax_topk_renormalized(logits, top_k)
        if top_k < num_experts:
            assert not (routed.ids == num_experts - 1).any()
        got = triton_moe.triton_fused_experts(x, w13, w2, routed.weights, routed.ids, activation=activation,
                                              w13_bias=b13, w2_bias=b2, config=SMALL)
        want = reference_experts(x, w13, w2, routed.weights, routed.ids, activation, b13, b2)
        assert got.shape == want.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=str((top_k, tokens, activation, bias)))

    # The few-token path (no align; per-pair matrix-vector kernels; the down kernel reads a token's k experts as one
    # [next_pow2(k), block_n, block_k] tile and sums them): K chunks that loop (16 < 24) and one masked chunk (32,
    # the default 1024), one or several output features per program, top-k 1, 2, 3 and 8 (powers of two and not).
    assert triton_moe.PAIR_PATH_MAX_TOKENS >= 3
    tiny_tiles = triton_moe.PairTiles(up_block_n=4, up_block_k=16, down_block_n=8, down_block_k=16)
    one_feature = triton_moe.PairTiles(up_block_n=2, up_block_k=64, up_num_warps=2, down_block_n=1, down_block_k=32,
                                       down_num_warps=2)
    # the K loops unrolled (K is a constant), the gate/up or down chunks summed one by one, the eviction hints
    unrolled = triton_moe.PairTiles(up_block_n=4, up_block_k=16, down_block_n=2, down_block_k=16, up_unroll=1,
                                    up_reduce_each=1, down_unroll=1, evict=1)
    unrolled_plain = triton_moe.PairTiles(up_block_n=8, up_block_k=16, down_block_n=4, down_block_k=32, up_unroll=1,
                                          down_unroll=1, evict=2)
    down_chunks = triton_moe.PairTiles(up_block_n=4, up_block_k=32, down_block_n=4, down_block_k=16,
                                       down_reduce_each=1)
    down_chunks_unrolled = triton_moe.PairTiles(up_block_n=4, up_block_k=16, down_block_n=2, down_block_k=16,
                                                down_reduce_each=1, down_unroll=1)
    for top_k in (1, 2, 3, 8):  # with the activation and bias picked below: each of their four combinations once
        for tokens in (1, 3):
            activation = ("silu", "swigluoai")[top_k % 2]
            bias = (top_k // 2) % 2 == 1
            x = torch.randn(tokens, hidden) * 2
            w13 = torch.randn(num_experts, 2 * inter, hidden) * 0.3
            w2 = torch.randn(num_experts, hidden, inter) * 0.3
            b13 = torch.randn(num_experts, 2 * inter) if bias else None
            b2 = torch.randn(num_experts, hidden) if bias else None
            routed = softmax_topk_renormalized(torch.randn(tokens, num_experts), top_k)
            want = reference_experts(x, w13, w2, routed.weights, routed.ids, activation, b13, b2)
            for tiles in (tiny_tiles, one_feature, unrolled, unrolled_plain, down_chunks, down_chunks_unrolled,
                          triton_moe.PairTiles(), None):
                got = triton_moe.triton_fused_experts(x, w13, w2, routed.weights, routed.ids, activation=activation,
                                                      w13_bias=b13, w2_bias=b2, pair_tiles=tiles)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=str((top_k, tokens, tiles)))
            # the top-k sum has a fixed order (no atomics): the same inputs give the same bits
            again = triton_moe.triton_fused_experts(x, w13, w2, routed.weights, routed.ids, activation=activation,
                                                    w13_bias=b13, w2_bias=b2, pair_tiles=tiles)
            assert torch.equal(got, again)
            # the two kernels alone: gate/up rows per pair, then the weighted sum over each token's experts
            ids = routed.ids.contiguous()
            rows = triton_moe.pair_gate_up(x, w13, ids, activation, b13, tiny_tiles, pdl=False)
            assert rows.shape == (tokens * top_k, inter)
            summed = triton_moe.pair_down_sum(rows, w2, routed.weights.contiguous(), ids, b2, one_feature, pdl=False)
            torch.testing.assert_close(summed, want, rtol=1e-4, atol=1e-4)

    # The default and a many-token config (block_m 64), and bfloat16 against the bfloat16 PyTorch path.
    x = torch.randn(70, hidden)
    w13 = torch.randn(num_experts, 2 * inter, hidden) * 0.3
    w2 = torch.randn(num_experts, hidden, inter) * 0.3
    routed = softmax_topk_renormalized(torch.randn(70, num_experts), 3)
    want = reference_experts(x, w13, w2, routed.weights, routed.ids)
    big = MoeTileConfig(block_m=64, up=GemmTiles(block_n=32, block_k=32), down=GemmTiles(block_n=16, block_k=64))
    for config in (None, big):
        got = triton_moe.triton_fused_experts(x, w13, w2, routed.weights, routed.ids, config=config)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    bf = [t.to(torch.bfloat16) for t in (x, w13, w2)]
    got = triton_moe.triton_fused_experts(*bf, routed.weights, routed.ids, config=SMALL)
    torch_path = fused_experts(*bf, routed.weights, routed.ids)
    assert got.dtype == torch.bfloat16
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 1e-2 and err < 2 * ((torch_path.float() - want).norm() / want.norm()).item() + 1e-3, err
    assert triton_moe.triton_fused_experts(x[:0], w13, w2, routed.weights[:0], routed.ids[:0]).shape == (0, hidden)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_moe_matches_per_expert_reference_under_the_interpreter():
    path = os.pathsep.join([str(_TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_tile_config_lookup(tmp_path, monkeypatch):
    decode = default_moe_config(num_tokens=1, top_k=8)
    assert decode.block_m == 16 and default_moe_config(4096, 8).block_m == 64
    assert moe_tile_config(3, 5, 7, torch.bfloat16, 10, 2) == default_moe_config(10, 2)  # no file for this shape
    small = MoeTileConfig(16, GemmTiles(32, 64, 4, 2), GemmTiles(64, 32, 4, 3))
    large = MoeTileConfig(128, GemmTiles(128, 64, 8, 4), GemmTiles(128, 64, 8, 4))
    name = moe_tile_configs.config_file_name(3, 5, 7, torch.bfloat16)
    assert name == "E=3,N=5,K=7,dtype=bfloat16.json"
    pair = PairTiles(up_block_n=8, up_block_k=512, up_num_warps=8, down_block_n=1, down_block_k=256, down_num_warps=2)
    assert PairTiles.from_json(pair.to_json()) == pair
    table = {"8": small.to_json(), "256": large.to_json(), moe_tile_configs.PAIR_KEY: pair.to_json()}
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setattr(moe_tile_configs, "CONFIG_DIR", tmp_path)
    moe_tile_configs._tuned.cache_clear()
    moe_tile_configs._table.cache_clear()
    try:
        picks = [moe_tile_config(3, 5, 7, torch.bfloat16, t, 2) for t in (1, 8, 9, 256, 5000)]
        assert picks == [small, small, large, large, large]  # the "pair" entry is no token bucket
        assert pair_tiles(3, 5, 7, torch.bfloat16) == pair
        assert pair_tiles(3, 5, 8, torch.bfloat16) == PairTiles()  # no file: the defaults
    finally:
        moe_tile_configs._tuned.cache_clear()
        moe_tile_configs._table.cache_clear()


def test_shipped_tile_configs_parse():
    for path in sorted(moe_tile_configs.CONFIG_DIR.glob("*.json")):
        for bucket, entry in json.loads(path.read_text()).items():
            if bucket == moe_tile_configs.PAIR_KEY:
                tiles = PairTiles.from_json(entry)
                sizes = [v for k, v in tiles.to_json().items() if k.endswith(("block_n", "block_k", "num_warps"))]
                assert len(sizes) == 6 and min(sizes) >= 1, path.name
                switches = {tiles.up_unroll, tiles.up_reduce_each, tiles.down_unroll, tiles.down_reduce_each}
                assert switches <= {0, 1}, path.name
                assert tiles.evict in (0, 1, 2), path.name
                continue
            config = MoeTileConfig.from_json(entry)
            assert int(bucket) >= 1 and config.block_m >= 16, path.name
            for tiles in (config.up, config.down):
                assert tiles.block_n >= 16 and tiles.block_k >= 16, path.name


def test_device_transform_hook_keeps_the_layer_and_cpu_path():
    from inferneo.kernel_config import KernelConfig
    from inferneo.model_executor.device_kernels import use_device_kernels, use_expert_kernel
    from inferneo.model_executor.layers.moe import FusedMoE, fused_experts
    from inferneo.model_executor.layers.moe_routing import make_router

    model = torch.nn.Sequential(FusedMoE(8, 4, 4, 2, make_router("softmax_topk", 2)), torch.nn.Linear(8, 8))
    use_device_kernels(model, torch.device("cpu"), KernelConfig())
    assert model[0].expert_kernel is fused_experts  # CPU keeps the PyTorch path
    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs)
        return fused_experts(*args, **kwargs)

    assert use_expert_kernel(model, kernel) == 1
    for p in model[0].parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        model[0](torch.randn(3, 8))
    assert calls == [{"activation": "silu", "w13_bias": None, "w2_bias": None}]
