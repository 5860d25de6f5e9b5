"""KernelConfig: the kernel switches of one engine, defaulting to the environment when built."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.kernel_config import KernelConfig

SWITCHES = {
    "cpu_onednn_linear": "INFERNEO_CPU_ONEDNN",
    "cpu_native_linear": "INFERNEO_CPU_NATIVE_LINEAR",
    "cpu_linear_tune": "INFERNEO_CPU_LINEAR_TUNE",
    "cpu_native_kernels": "INFERNEO_CPU_KERNELS",
    "triton_ops": "INFERNEO_TRITON_OPS",
    "triton_gemv": "INFERNEO_TRITON_GEMV",
    "gemv_silu": "INFERNEO_GEMV_SILU",
    "fp8_gemv": "INFERNEO_FP8_GEMV",
    "cuda_pdl": "INFERNEO_CUDA_PDL",
    "peer_all_reduce": "INFERNEO_PEER_ALL_REDUCE",
    "peer_push": "INFERNEO_PEER_PUSH",
    "cuda_fused_qk_norm_rope": "INFERNEO_CUDA_FUSED_QK_NORM_ROPE",
    "cuda_fused_routing": "INFERNEO_CUDA_FUSED_ROUTING",
    "gguf_int8_dot": "INFERNEO_GGUF_INT8_DOT",
    "gguf_wide16": "INFERNEO_GGUF_WIDE16",
    "gguf_int16": "INFERNEO_GGUF_INT16",
}


# Fields that name a choice rather than switch something on or off: (variable, default).
CHOICES = {"cpu_linear_kernel": ("INFERNEO_CPU_LINEAR_KERNEL", "auto")}


def test_one_field_per_environment_switch():
    fields = [f.name for f in dataclasses.fields(KernelConfig)]
    assert fields == ["cpu_onednn_linear", "cpu_native_linear", *CHOICES, *list(SWITCHES)[2:]]
    for name in [*SWITCHES, *CHOICES]:
        assert callable(getattr(envs, name))  # each field's default is the envs function of the same name


# Switches that stay off unless their variable turns them on.
OFF_BY_DEFAULT = {"gguf_int8_dot"}


@pytest.mark.parametrize("field", list(SWITCHES))
def test_each_field_defaults_to_its_variable_read_when_built(monkeypatch, field):
    monkeypatch.delenv(SWITCHES[field], raising=False)
    default = field not in OFF_BY_DEFAULT
    before = KernelConfig()
    assert getattr(before, field) is default
    monkeypatch.setenv(SWITCHES[field], "0" if default else "1")
    after = KernelConfig.from_env()
    assert getattr(after, field) is not default and getattr(before, field) is default  # built earlier: unchanged
    assert getattr(KernelConfig(**{field: default}), field) is default  # a field given by name wins over the env
    others = {name for name in SWITCHES if name != field}
    assert all(getattr(after, name) == getattr(before, name) for name in others)


@pytest.mark.parametrize("field", list(CHOICES))
def test_each_choice_defaults_to_its_variable_and_is_checked(monkeypatch, field):
    variable, default = CHOICES[field]
    monkeypatch.delenv(variable, raising=False)
    assert getattr(KernelConfig(), field) == default
    monkeypatch.setenv(variable, "Torch ")
    assert getattr(KernelConfig(), field) == "torch"
    with pytest.raises(ValueError, match=f"{field} \\({variable}\\) must be one of"):
        KernelConfig(**{field: "fastest"})


def test_frozen_checked_and_picklable():
    kernels = KernelConfig(triton_ops=False, cuda_pdl=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernels.triton_ops = True
    with pytest.raises(TypeError, match="triton_gemv must be True or False"):
        KernelConfig(triton_gemv="no")
    assert pickle.loads(pickle.dumps(kernels)) == kernels  # it travels to engine and tensor-parallel processes


def test_engine_config_carries_the_kernels(monkeypatch):
    monkeypatch.setenv("INFERNEO_CPU_KERNELS", "0")
    assert EngineConfig().kernels.cpu_native_kernels is False
    assert EngineConfig(kernels=KernelConfig(cpu_native_kernels=True)).kernels.cpu_native_kernels is True


def test_pdl_only_on_cuda_with_the_switch_on():
    assert not KernelConfig(cuda_pdl=True).pdl_on(torch.device("cpu"))
    assert not KernelConfig(cuda_pdl=False).pdl_on(torch.device("cuda", 0))  # asks no GPU when switched off


def test_model_files_are_plain_pytorch():
    """Device kernels are swapped in by ``device_kernels`` once; the model files neither import kernels nor know
    of the tensor-parallel partial sums."""
    import inspect

    from inferneo.model_executor.layers import basic, rotary
    from inferneo.model_executor.models import llama, qwen

    for module in (llama, qwen, basic, rotary):
        source = inspect.getsource(module)
        for word in ("inferneo.kernels", "PartialSum", "is_cuda", "device.type", "envs"):
            assert word not in source, (module.__name__, word)
