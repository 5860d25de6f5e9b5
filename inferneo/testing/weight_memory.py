"""How much memory building an engine adds, against the bytes of the model's weights.

:func:`measure_engine_memory` runs ``python -m inferneo.testing.weight_memory`` in a fresh process: it imports the
engine, reads its resident set size (and on CUDA the caching allocator's reserved bytes), builds ``LLM(model,
kv_cache_memory=...)`` and reads them again, then once more after the heap has handed its free pages back
(``host_held``: on CPU the warm-up pass leaves its step buffers cached in the heap for the first requests, memory
sized by the token budget and the model's widths, not by its weights). :func:`weight_excess` then takes out the KV
cache the engine allocated and the fixed cost of building any engine (libraries loaded on first use, kernels, the
tokenizer), measured the same way on a tiny checkpoint, and divides by the weight bytes: 1.0 means every weight is
held exactly once. Used by ``tests/test_weight_memory.py`` (CPU) and ``benchmarks/gpu/weight_memory.py`` (CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

KV_CACHE_MEMORY = 64 * 2**20  # the fixed KV cache every measurement configures
# The default model's shapes (SmolLM2-135M) for make_tiny_checkpoint, where its GGUF file is not installed.
DEFAULT_MODEL_SHAPES = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                            tie_word_embeddings=True, max_position_embeddings=8192)


@dataclass(frozen=True, slots=True)
class EngineMemory:
    """One engine build's memory, in bytes.

    ``weight_bytes``: the model's parameters in their loaded dtypes (a tied weight once). ``kv_bytes``: the KV cache
    the engine allocated. ``host_added``: resident set size after the build minus before it (after the imports).
    ``device_added``: on CUDA, the caching allocator's reserved bytes after minus before (None on CPU).
    ``host_held``: ``host_added`` once glibc's heap has given its free pages back (``malloc_trim``; None where
    that is not available): what the process holds, without the heap's cache of freed step buffers.
    """

    model: str
    dtype: str
    device: str
    weight_bytes: int
    kv_bytes: int
    host_added: int
    device_added: int | None = None
    host_held: int | None = None


def weight_excess(measured: EngineMemory, fixed: EngineMemory, on_device: bool = False, held: bool = False) -> float:
    """Memory ``measured`` added beyond its KV cache and the fixed cost (``fixed``: a tiny model's build, less
    its own weights and KV cache), per weight byte; ``on_device`` reads the CUDA figures instead of the host's,
    ``held`` the host's held figures (``host_held``)."""
    if on_device:
        added, fixed_added = measured.device_added, fixed.device_added
    elif held:
        added, fixed_added = measured.host_held, fixed.host_held
    else:
        added, fixed_added = measured.host_added, fixed.host_added
    if added is None or fixed_added is None:
        raise ValueError("not measured here (device memory of a CPU engine, or held memory without glibc)")
    fixed_cost = fixed_added - fixed.kv_bytes - fixed.weight_bytes
    return (added - measured.kv_bytes - fixed_cost) / measured.weight_bytes


def measure_engine_memory(model: str | os.PathLike[str], dtype: str = "auto", device: str = "cpu",
                          env: dict[str, str] | None = None, timeout: float = 600, **engine_options) -> EngineMemory:
    """Build ``LLM(model, dtype=, device=, kv_cache_memory=KV_CACHE_MEMORY, **engine_options)`` in a fresh
    process (with ``env`` added to this one's environment) and return what it added."""
    command = [sys.executable, "-m", "inferneo.testing.weight_memory", "--model", os.fspath(model),
               "--dtype", dtype, "--device", device, "--options", json.dumps(engine_options)]
    done = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return EngineMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def write_default_model_copy(folder: Path, dtype) -> Path:
    """The bundled default model (a Q4_1 GGUF, de-quantized) as a Hugging Face folder in ``dtype`` (a torch dtype):
    config, tokenizer and one safetensors file, so that full-precision loading is measured whatever the GGUF loader
    keeps in memory. Raises FileNotFoundError when the default model is not installed."""
    from safetensors.torch import save_file

    from inferneo.model_loader import iter_weights, load_hf_config, load_tokenizer, resolve_model

    source = resolve_model(None)
    folder.mkdir(parents=True, exist_ok=True)
    config = load_hf_config(source)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("quantization_config", None)  # the GGUF's: the copy holds full-width tensors
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    load_tokenizer(source).save_pretrained(folder)
    save_file({name: tensor.to(dtype).contiguous() for name, tensor in iter_weights(source)},
              str(folder / "model.safetensors"))
    return folder


def resident_bytes() -> int:
    """This process's resident set size."""
    import psutil

    return psutil.Process().memory_info().rss


def model_weight_bytes(model_runner) -> int:
    """Bytes of a single-rank ``ModelRunner``'s model parameters as loaded (quantized layers in their format, a tied
    weight once), counted on a copy of the model built on the meta device (the loaded one's packed layers hold no
    parameters). Reads the runner's own members, beyond the engine's ``Runner`` interface: a measuring tool."""
    import torch

    from inferneo.quantization import quantize_linears

    with torch.device("meta"):
        model = type(model_runner.model)(model_runner.model_config, model_runner.backend,
                                         max_position=model_runner.max_model_len)
    model.cast(model_runner.dtype)
    if model_runner.quant_config is not None:
        quantize_linears(model, model_runner.quant_config, model_runner.dtype, torch.device("meta"))
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())


def _measure(model: str, dtype: str, device: str, options: dict) -> EngineMemory:
    import torch

    from inferneo import LLM
    from inferneo.worker.cpu_tuning import release_freed_memory

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
    host_before = resident_bytes()
    device_before = torch.cuda.memory_reserved() if cuda else 0
    llm = LLM(model, dtype=dtype, device=device, kv_cache_memory=KV_CACHE_MEMORY, **options)
    host_added = resident_bytes() - host_before
    device_added = torch.cuda.memory_reserved() - device_before if cuda else None
    host_held = resident_bytes() - host_before if release_freed_memory() else None
    info = llm.engine.info
    return EngineMemory(model=model, dtype=info.dtype, device=info.device,
                        weight_bytes=model_weight_bytes(llm.engine.runner),
                        kv_bytes=(info.num_blocks + 1) * info.kv_bytes_per_block,  # with the spare padding block
                        host_added=host_added, device_added=device_added, host_held=host_held)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="{}", help="more LLM keyword arguments, as a JSON object")
    args = parser.parse_args(argv)
    measured = _measure(str(Path(args.model)), args.dtype, args.device, json.loads(args.options))
    print(json.dumps(asdict(measured)))


if __name__ == "__main__":
    main()
