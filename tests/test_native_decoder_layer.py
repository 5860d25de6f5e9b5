"""The CPU decoder layer that calls its native kernels itself (``device_kernels.NativeDecoderLayer``).

- The CPU engine swaps plain Llama-shaped layers (the rotary-in-place attention) for it, and Qwen3's (per-head
  q/k norms, run with the rotary embedding as one native kernel).
- It computes what the plain layer computes, bit for bit: the same kernels in the same order, with a GGUF layer's
  one-call matmul (float32 and bfloat16, prompt log-probabilities of mixed batches compared exactly), and greedy
  tokens equal Hugging Face's.
- A projection or MLP replaced after the kernels went in (as LoRA wraps them) is called as that module.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM, SamplingParams
from inferneo.kernels.cpu_gguf import load_gguf_kernels
from inferneo.model_executor.models.llama import DecoderLayer
from inferneo.testing import make_tiny_gguf


def _layers(llm: LLM) -> list:
    return list(llm.engine.runner.model.layers)


def _native_engine(path, **kwargs) -> LLM:
    llm = LLM(str(path), enable_prefix_caching=False, **kwargs)
    if llm.engine.runner.backend.name != "cpu":
        pytest.skip("the native CPU kernels could not be built here")
    return llm


def _prompt_scores(llm: LLM, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.prompt_logprobs, o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


def test_plain_layers_become_native_and_give_hf_tokens(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    llm = _native_engine(path, dtype="float32", max_num_batched_tokens=64)
    assert {type(layer).__name__ for layer in _layers(llm)} == {"NativeDecoderLayer"}
    prompts = mixed_prompts(8, 300, seed=11, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]


def test_layers_with_qk_norms_run_the_fused_norm_and_rotary_kernel(tiny_checkpoint_factory):
    """Qwen3's layers (per-head q/k norms) become native too, their norms and rotary one kernel; the tokens are
    Hugging Face's, and equal those of the plain layer with the modules' PyTorch norms and rotary."""
    from inferneo.model_executor.device_kernels import QKNormRotaryAttention
    from inferneo.model_executor.models.llama import Attention

    path = tiny_checkpoint_factory("qwen3")
    llm = _native_engine(path, dtype="float32", max_num_batched_tokens=64)
    layers = _layers(llm)
    assert {type(layer).__name__ for layer in layers} == {"NativeDecoderLayer"}
    assert {type(layer.self_attn) for layer in layers} == {QKNormRotaryAttention}
    prompts = mixed_prompts(8, 300, seed=4, shared_prefix=20)
    expected = [hf_greedy(path, p) for p in prompts]
    assert run_engine(llm, prompts) == expected
    native_class = type(layers[0])
    for layer in layers:
        layer.__class__, layer.self_attn.__class__ = DecoderLayer, Attention
    assert run_engine(llm, prompts) == expected
    for layer in layers:
        layer.__class__, layer.self_attn.__class__ = native_class, QKNormRotaryAttention


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("quant", "hidden"), [("Q4_1", 256), (None, 256), ("Q4_1", 192)])
def test_native_layer_computes_what_the_plain_layer_computes(tiny_checkpoint_factory, tmp_path, dtype, quant, hidden):
    """Prompt log-probabilities, sampled tokens and their log-probabilities of a mixed batch (chunked prefill,
    decode rows of several lengths), with the layers as they are and switched back to the plain class: equal
    exactly (GGUF Q4_1 layers: the one-call matmul; the float32 folder: packed linears called as modules; hidden
    192, an intermediate size of 384 = 8 x 48: on an AMX CPU in bfloat16 the gate/up projection and SiLU-and-mul
    in one kernel pass at 10-64 rows)."""
    source = tiny_checkpoint_factory("llama", hidden_size=hidden)
    path = make_tiny_gguf(source, tmp_path / "tiny.gguf", dtype=quant) if quant else source
    llm = _native_engine(path, dtype=dtype, max_num_batched_tokens=48)
    layers = _layers(llm)
    native_class = type(layers[0])
    assert native_class.__name__ == "NativeDecoderLayer"
    if quant:
        qkv = layers[0].self_attn.qkv_proj
        assert qkv.single_matmul is not None and layers[0]._linear(qkv) is qkv.single_matmul
        ops = load_gguf_kernels()
        fused = hidden == 192 and dtype == "bfloat16" and ops is not None and ops.gguf_packed_amx_available()
        assert (layers[0].mlp.gate_up_proj.silu_matmul is not None) == fused
    prompts = mixed_prompts(6, 300, seed=3)
    native = _prompt_scores(llm, prompts)
    for layer in layers:
        layer.__class__ = DecoderLayer
    plain = _prompt_scores(llm, prompts)
    for layer in layers:
        layer.__class__ = native_class
    assert native == plain
    assert _prompt_scores(llm, prompts) == native


def test_a_projection_replaced_later_is_called_as_a_module(tiny_checkpoint_factory, tmp_path):
    """A wrapper put around a quantized projection and around the MLP after start-up (as LoRA does) is what the
    native layer calls; with pass-through wrappers the results are unchanged."""
    source = tiny_checkpoint_factory("llama", hidden_size=256)
    llm = _native_engine(make_tiny_gguf(source, tmp_path / "tiny.gguf", dtype="Q4_1"), dtype="float32")
    prompts = mixed_prompts(4, 300, seed=8)
    before = _prompt_scores(llm, prompts)
    calls = {"o_proj": 0, "mlp": 0}

    class Counting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, name: str) -> None:
            super().__init__()
            self.inner, self.name = inner, name

        def forward(self, x):
            calls[self.name] += 1
            return self.inner(x)

    layer = _layers(llm)[1]
    layer.self_attn.o_proj = Counting(layer.self_attn.o_proj, "o_proj")
    layer.mlp = Counting(layer.mlp, "mlp")
    assert _prompt_scores(llm, prompts) == before
    assert calls["o_proj"] > 0 and calls["o_proj"] == calls["mlp"]
