"""GGUF mixture-of-experts experts kept in their ggml blocks (``quantization/gguf_experts.py``).

Tiny Qwen3-MoE, Qwen2-MoE and Mixtral files (Q8_0 experts; Q4_K experts, Qwen3's marked slow; Mixtral's Q4_K gate/up
with one layer's down experts in Q6_K, as Q4_K_M files have; a layer whose gate and up differ in type; experts whose
down rows fall back to F16; a Mixtral file with one tensor per expert):

- a layer whose three expert tensors are of kept types, gate and up of one, holds them as uint8 blocks: its expert
  parameters take exactly the file's block bytes (no full-width copy), and de-quantize to what ``gguf.quants``
  reads from the file, bit for bit; the other layers keep float experts, and the plan says why;
- the layer's output equals ``fused_experts`` on the de-quantized experts to 1e-4 relative / 1e-5 absolute
  (float32: the native kernels de-quantize in registers, bit for bit, and only the summation order differs; measured
  about 1e-7 of the output's scale) for one token and for a batch with uneven expert loads and empty experts;
- in bfloat16 the engine agrees with the float32 reference about as long as the de-quantized bfloat16 engine does;
- the engine's greedy tokens equal the same file run de-quantized (``INFERNEO_GGUF_DEQUANTIZE=1``), float32, with
  the exact GGUF kernels (``gguf_int16`` and ``gguf_int8_dot`` off: on an AVX512_VNNI CPU the default holds the
  activations of the attention's wide16 layers as 16-bit integers from 16 rows, which moved one greedy token of
  the Qwen3 file whether its experts were in blocks or not; the experts' own matmul is exact either way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from test_hf_parity import mixed_prompts, run_engine

from inferneo import LLM
from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.device_kernels import use_expert_kernel
from inferneo.model_executor.layers.moe import FusedMoE, fused_experts
from inferneo.model_executor.layers.moe_routing import RouterOutput
from inferneo.model_loader.gguf_file import read_gguf_header
from inferneo.quantization.gguf_experts import GGUFExperts, plan_gguf_experts
from inferneo.testing import make_tiny_gguf

# name -> (architecture, hidden size, file type, per-tensor types)
CASES = {
    "qwen3-q8_0": ("qwen3_moe", 64, "Q8_0", None),
    # Q4_K experts (256-weight blocks need 256-wide rows: Mixtral's experts are 2 * hidden wide), layer 0's down
    # experts in Q6_K: its down projection runs in another format than gate/up
    "mixtral-q4_k": ("mixtral", 256, "Q4_K", {r"blk\.0\.ffn_down_exps\.weight": "Q6_K"}),
    # Qwen3-MoE's experts are hidden / 2 wide: 512 for 256-wide down rows
    "qwen3-q4_k": ("qwen3_moe", 512, "Q4_K", None),
    # layer 1's gate experts in Q4_0 beside Q8_0 up experts: that layer falls back, layer 0 stays in blocks
    "qwen2-mixed": ("qwen2_moe", 64, "Q8_0", {r"blk\.1\.ffn_gate_exps\.weight": "Q4_0"}),
    # Q4_K with 128-wide down rows: they cannot fill 256-weight blocks and are written F16, so every layer falls back
    "qwen3-f16-down": ("qwen3_moe", 256, "Q4_K", None),
}
# which layers of each case hold their experts in blocks
KEPT_LAYERS = {
    "qwen3-q4_k": {0, 1},
    "qwen3-q8_0": {0, 1},
    "mixtral-q4_k": {0, 1},
    "qwen2-mixed": {0},
    "qwen3-f16-down": set(),
}
FALLBACK_REASONS = {
    "qwen2-mixed": "gate (Q4_0) and up (Q8_0) experts differ in type",
    "qwen3-f16-down": "ffn_down_exps in F16 (not a type kept in blocks)",
}

# the 512-wide Qwen3 file takes a minute or two to build and run on a loaded 2-core machine
SLOW_CASES = {"qwen3-q4_k"}
ALL_CASES = [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]


def _name(case) -> str:
    return case if isinstance(case, str) else case.values[0]


EXACT = dict(
    dtype="float32", max_num_batched_tokens=32, kernels=KernelConfig(gguf_int16=False, gguf_int8_dot=False)
)

_files: dict[str, Path] = {}
_engines: dict[str, LLM] = {}


@pytest.fixture(scope="module")
def gguf_file(tiny_checkpoint_factory, tmp_path_factory):
    def make(case: str) -> Path:
        if case not in _files:
            arch, hidden, dtype, types = CASES[case]
            hf_dir = tiny_checkpoint_factory(arch, hidden_size=hidden)
            _files[case] = make_tiny_gguf(
                hf_dir, tmp_path_factory.mktemp(case) / f"{case}.gguf", dtype, tensor_types=types
            )
        return _files[case]

    return make


@pytest.fixture(scope="module")
def engine(gguf_file):
    def make(case: str) -> LLM:
        if case not in _engines:
            _engines[case] = LLM(str(gguf_file(case)), **EXACT)
        return _engines[case]

    yield make
    _engines.clear()


def _moe_layers(llm: LLM) -> dict[int, FusedMoE]:
    return {
        int(name.split(".")[1]): m
        for name, m in llm.engine.runner.model.named_modules()
        if isinstance(m, FusedMoE)
    }


def _file_experts(path: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The layer's experts as ``gguf.quants`` de-quantizes them: ``([E, 2I, H] gate then up rows, [E, H, I])``."""
    tensors = {
        t.name: quants.dequantize(t.data, t.tensor_type)
        for t in GGUFReader(path).tensors
        if t.name.startswith(f"blk.{layer}.ffn_") and t.name.endswith("_exps.weight")
    }
    gate, up, down = (tensors[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
    return np.concatenate([gate, up], axis=1), down


@pytest.mark.parametrize("case", ALL_CASES)
def test_experts_are_held_as_the_files_blocks(case, gguf_file, engine):
    path = gguf_file(case)
    plans = plan_gguf_experts(read_gguf_header(path))
    assert {
        int(layer.split(".")[1]) for layer, plan in plans.items() if plan.tensors is not None
    } == KEPT_LAYERS[case]
    if case in FALLBACK_REASONS:
        assert FALLBACK_REASONS[case] in {plan.reason for plan in plans.values()}
    for index, moe in _moe_layers(engine(case)).items():
        experts = moe.experts
        if index not in KEPT_LAYERS[case]:
            assert not isinstance(experts, GGUFExperts) and not moe.expert_kernel_fixed
            assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float32
            continue
        assert isinstance(experts, GGUFExperts) and moe.expert_kernel_fixed
        params = dict(experts.named_parameters())
        assert set(params) == {"gate_up_proj", "down_proj"}
        assert all(p.dtype == torch.uint8 for p in params.values())
        # exactly the file's bytes: no full-width copy is kept beside them
        tensors = plans[f"layers.{index}.mlp"].tensors
        assert sum(p.numel() for p in params.values()) == tensors.nbytes
        gate_up, down = _file_experts(path, index)
        ours = experts.dequantized()
        assert torch.equal(ours[0].cpu(), torch.from_numpy(gate_up)) and torch.equal(
            ours[1].cpu(), torch.from_numpy(down)
        )


def _routing(ids: list[list[int]], seed: int) -> RouterOutput:
    ids_t = torch.tensor(ids)
    weights = torch.softmax(torch.randn(ids_t.shape, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return RouterOutput(weights, ids_t)


# one token (the decode path), and 7 tokens whose 14 pairs load expert 0 six times, 1-3 once or twice, and leave 4-7
# (of 8) without a pair
ROUTINGS = {"one_token": [[5, 2]], "uneven": [[0, 1], [0, 2], [1, 0], [0, 3], [2, 0], [0, 3], [1, 2]]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("case", [c for c in ALL_CASES if _name(c) != "qwen3-f16-down"])
def test_layer_output_equals_the_dequantized_experts(case, routing, dtype, engine):
    """float32 to 1e-4 relative / 1e-5 of the output's scale; bfloat16 activations (the kernels accumulate in
    float32 and round the projections' outputs to bfloat16) against the float32 reference to 2e-2 of its scale."""
    llm = engine(case)
    for index in sorted(KEPT_LAYERS[case]):
        moe = _moe_layers(llm)[index]
        hidden = moe.experts.hidden_size
        routed = _routing(ROUTINGS[routing], seed=index)
        x = torch.randn(routed.ids.shape[0], hidden, generator=torch.Generator().manual_seed(7 + index))
        w13, w2 = (w.cpu() for w in moe.experts.dequantized())
        expected = fused_experts(x, w13, w2, routed.weights, routed.ids, activation=moe.activation)
        device = moe.experts.down_proj.device  # the engine's: CUDA where a GPU is present
        on_device = RouterOutput(routed.weights.to(device), routed.ids.to(device))
        with torch.no_grad():
            got = moe.routed_experts(x.to(device, dtype), on_device).cpu()
        assert got.dtype == dtype
        scale = expected.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
        else:
            torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("case", ALL_CASES)
def test_greedy_tokens_equal_the_dequantized_file(case, gguf_file, engine, monkeypatch):
    prompts = mixed_prompts(6, 300, seed=31, shared_prefix=8)
    tokens = run_engine(engine(case), prompts)
    monkeypatch.setenv("INFERNEO_GGUF_DEQUANTIZE", "1")
    reference = LLM(str(gguf_file(case)), **EXACT)
    assert not any(isinstance(m, GGUFExperts) for m in reference.engine.runner.model.modules())
    assert tokens == run_engine(reference, prompts)


def _agreeing_prefix(runs: list[list[int]], reference: list[list[int]]) -> int:
    """Tokens of ``runs`` before each run first departs from ``reference``, summed."""
    return sum(
        next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), len(expected))
        for got, expected in zip(runs, reference, strict=True)
    )


def test_bfloat16_engine_stays_as_close_to_float32_as_the_dequantized_bfloat16_engine(gguf_file, monkeypatch):
    """In bfloat16 the block experts multiply exact float32 weights with bf16 activations (float32 accumulation)
    while the de-quantized engine rounds every weight to bf16 first, so the two are not expected to agree token for
    token; both are compared with the float32 de-quantized engine instead, and the block one must agree at least as
    long (summed over prompts, before the first differing token) as the full-width bf16 engine, less 10% of the
    tokens for near-ties (as test_gguf_quantized asks of the linear layers). Measured 2026-12-07 (AVX512_BF16
    host): 159 of 192 tokens against the full-width bf16 engine's 161."""
    path = gguf_file("qwen3-q8_0")
    prompts = mixed_prompts(16, 300, seed=11)
    with monkeypatch.context() as patch:
        patch.setenv("INFERNEO_GGUF_DEQUANTIZE", "1")
        exact = run_engine(LLM(str(path), dtype="float32"), prompts)
        full_width = _agreeing_prefix(run_engine(LLM(str(path), dtype="bfloat16"), prompts), exact)
    llm = LLM(str(path), dtype="bfloat16")
    assert any(isinstance(m, GGUFExperts) for m in llm.engine.runner.model.modules())
    blocks = _agreeing_prefix(run_engine(llm, prompts), exact)
    assert blocks >= full_width - 0.1 * sum(map(len, exact)), (blocks, full_width)


def test_device_kernels_leave_block_experts_their_kernel(engine):
    model = engine("qwen2-mixed").engine.runner.model
    layers = _moe_layers(engine("qwen2-mixed"))
    before = {index: moe.expert_kernel for index, moe in layers.items()}

    def other_kernel(*args, **kwargs):
        raise AssertionError("not called")

    assert use_expert_kernel(model, other_kernel) == 1  # layer 1 (float experts) only
    assert layers[0].expert_kernel == before[0] and layers[1].expert_kernel is other_kernel
    layers[1].expert_kernel = before[1]


def test_dummy_blocks_dequantize_to_finite_weights():
    from inferneo.quantization.gguf import block_matmul_for
    from inferneo.quantization.gguf_blocks import KEPT_FORMATS, BlockFormat

    fmt: BlockFormat = next(f for f in KEPT_FORMATS.values() if f.name == "Q4_K")
    experts = GGUFExperts(3, 256, 256, fmt, fmt, torch.device("cpu"), block_matmul_for)
    experts.init_dummy(torch.Generator().manual_seed(0))
    gate_up, down = experts.dequantized()
    assert gate_up.shape == (3, 512, 256) and down.shape == (3, 256, 256)
    assert torch.isfinite(gate_up).all() and torch.isfinite(down).all() and gate_up.abs().sum() > 0


def test_one_tensor_per_expert_files_hold_their_experts_in_blocks_too(tiny_checkpoint_factory, tmp_path):
    """llama.cpp's first Mixtral files (``blk.N.ffn_gate.E.weight``, one tensor per expert) load into the same
    blocks as the stacked file: the same bytes, the same experts, the same greedy tokens."""
    hf_dir = tiny_checkpoint_factory("mixtral")
    stacked = make_tiny_gguf(hf_dir, tmp_path / "stacked.gguf", "Q8_0")
    old = make_tiny_gguf(hf_dir, tmp_path / "per-expert.gguf", "Q8_0", per_expert_tensors=True)
    plans = plan_gguf_experts(read_gguf_header(old))
    assert all(plan.tensors is not None and plan.tensors.per_expert for plan in plans.values())
    llm, reference = LLM(str(old), **EXACT), LLM(str(stacked), **EXACT)
    for index, moe in _moe_layers(llm).items():
        assert isinstance(moe.experts, GGUFExperts)
        assert sum(p.numel() for p in moe.experts.parameters()) == plans[f"layers.{index}.mlp"].tensors.nbytes
        theirs = _moe_layers(reference)[index].experts
        assert torch.equal(moe.experts.gate_up_proj, theirs.gate_up_proj)
        assert torch.equal(moe.experts.down_proj, theirs.down_proj)
    prompts = mixed_prompts(4, 300, seed=5)
    assert run_engine(llm, prompts) == run_engine(reference, prompts)
