"""The tensor-parallel runner's start-up and its interface with the engine.

Start-up: a worker that dies before it joins the group (here the classic cause, a program read from standard
input, which ``spawn`` cannot import again in the worker) fails the engine's construction within seconds with an
error that names the worker, its exit code, the cause and the fix; before, the driver sat 121 s in the store's
rendezvous. (A normal start is covered by every test of ``test_tensor_parallel_engine.py``.)

Interface: ``Runner`` lists what the engine uses; both runners implement it with matching signatures, the
tensor-parallel runner defines each member itself (no ``__getattr__`` forwarding) and marks where it runs, and
the engine and the API server use no runner member outside the list.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
from source_ast import parse_file

from inferneo.worker.model_runner import ModelRunner
from inferneo.worker.runner_api import DRIVER_ONLY, EVERY_RANK, Runner, runner_members
from inferneo.worker.tensor_parallel import TensorParallelRunner

ROOT = Path(__file__).resolve().parents[1]

# Read by benchmarks and tools (``benchmarks/gpu/tp_suite.py`` prints them at TP > 1), not by the engine.
READ_BY_TOOLS = {"backend", "decode_buckets"}
# Probed with ``getattr(runner, name, default)``, so a runner without it still works: the test-fault hook
# wraps the rank-0 ModelRunner behind a tensor-parallel runner.
OPTIONAL_PROBES = {"driver"}


# ---- start-up ------------------------------------------------------------------------------------------------

STDIN_SCRIPT = """\
import time
from inferneo import LLM
from inferneo.model_loader import load_tokenizer, resolve_model

load_tokenizer(resolve_model({path!r}))  # warm the tokenizer's imports: the clock times the runner's start only
start = time.monotonic()
try:
    LLM({path!r}, tensor_parallel_size=2, device="cpu", dtype="float32", max_model_len=256,
        kv_cache_memory="32MiB", num_threads=1)
except Exception as exc:
    print("ELAPSED", time.monotonic() - start)
    print("ERROR", type(exc).__name__, exc)
else:
    print("STARTED")
"""


def test_a_worker_that_dies_while_starting_fails_the_engine_within_seconds(tiny_checkpoint_factory, tmp_path):
    path = str(tiny_checkpoint_factory("llama", num_heads=4, num_kv_heads=2))
    wall = time.monotonic()
    proc = subprocess.run([sys.executable, "-"], input=STDIN_SCRIPT.format(path=path), capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    wall = time.monotonic() - wall
    out = proc.stdout
    assert "STARTED" not in out, out
    assert "ELAPSED" in out, (out, proc.stderr[-3000:])
    elapsed = float(out.split("ELAPSED", 1)[1].split()[0])
    assert elapsed < 10, f"the start-up error took {elapsed:.1f} s"
    error = out.split("ERROR", 1)[1]
    assert "WorkerDiedError tensor-parallel worker 1 exited with code 1 while starting" in error
    assert "'spawn'" in error and "not from standard input" in error
    assert 'if __name__ == "__main__":' in error
    # The worker's own traceback reached standard error: the main module '<stdin>' could not be imported again.
    assert "<stdin>" in proc.stderr
    assert wall < 120, f"the program took {wall:.0f} s to exit"  # before: 121 s in the rendezvous, then more


# ---- the interface -------------------------------------------------------------------------------------------

def _params(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [ModelRunner, TensorParallelRunner])
def test_both_runners_implement_the_interface_with_its_signatures(cls):
    assert issubclass(cls, Runner)
    assert not cls.__abstractmethods__
    for name in runner_members():
        declared = inspect.getattr_static(Runner, name, None)
        if callable(declared):
            assert _params(getattr(cls, name)) == _params(declared), f"{cls.__name__}.{name}"


def test_the_tensor_parallel_runner_defines_every_member_itself_and_says_where_it_runs():
    own = vars(TensorParallelRunner)
    for klass in TensorParallelRunner.__mro__[:-1]:  # nothing forwards unknown names (object's is not there)
        assert "__getattr__" not in vars(klass) and "__getattribute__" not in vars(klass), klass
    where = {}
    for name in runner_members():
        assert name in own, f"TensorParallelRunner.{name} is not defined by the runner itself"
        member = own[name]
        fn = member.fget if isinstance(member, property) else member
        where[name] = getattr(fn, "__runs_on__", None)
        assert where[name] in (EVERY_RANK, DRIVER_ONLY), f"TensorParallelRunner.{name} does not say where it runs"
    # Every set-up call, every step and every change of the weights or of sleep mode reaches the workers; what the
    # driver alone answers is read-only.
    assert {n for n, w in where.items() if w == EVERY_RANK} == {
        "load_weights", "init_dummy_weights", "finalize_weights", "profile_kv_memory", "allocate_kv_cache",
        "execute", "launch", "shutdown", "update_weights", "sleep", "wake_up", "enable_lora"}
    for name, w in where.items():
        if isinstance(own[name], property):
            assert w == DRIVER_ONLY and own[name].fset is None, name


def test_a_name_outside_the_interface_is_not_forwarded_to_the_driver():
    runner = object.__new__(TensorParallelRunner)  # no processes: only attribute lookup is under test
    runner.driver = type("Driver", (), {"num_blocks": 7, "model_config": "config"})()
    assert runner.model_config == "config"  # an interface member, answered by the driver
    with pytest.raises(AttributeError):
        _ = runner.num_blocks  # a driver attribute the interface does not list


def _engine_uses() -> tuple[set[str], set[str]]:
    """Names the engine and the entry points read on a runner (``<x>.runner.NAME``, ``runner.NAME``), and those
    they only probe (``getattr(<x>.runner, "NAME", default)``, ``hasattr``)."""
    def is_runner(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "runner") or (
            isinstance(node, ast.Attribute) and node.attr == "runner")

    direct, probed = set(), set()
    files = [p for p in (ROOT / "inferneo").rglob("*.py") if "worker" not in p.relative_to(ROOT).parts]
    for path in files:
        for node in ast.walk(parse_file(path)):
            if isinstance(node, ast.Attribute) and is_runner(node.value):
                direct.add(node.attr)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 and is_runner(node.args[0])
                  and isinstance(node.args[1], ast.Constant)):
                probed.add(node.args[1].value)
    return direct, probed


def test_the_interface_matches_what_the_engine_calls():
    members = set(runner_members())
    direct, probed = _engine_uses()
    assert {"execute", "launch", "load_weights", "allocate_kv_cache", "model_config"} <= direct  # the scan works
    assert direct <= members, f"the engine uses runner members outside the interface: {direct - members}"
    assert probed <= members | OPTIONAL_PROBES, f"the engine probes unknown runner members: {probed - members}"
    assert members - direct - probed == READ_BY_TOOLS, "interface members nobody uses"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_model_contract_the_runners_rely_on(tiny_checkpoint_factory, arch):
    """The ``CausalLM`` interface (``models/interface.py``): the runner reads ``num_kv_heads`` and calls ``cast``,
    never reaching into the layers."""
    import torch

    from inferneo.attention import TorchReferenceBackend
    from inferneo.model_executor.models.registry import get_model_class
    from inferneo.model_loader import load_hf_config, resolve_model

    folder = tiny_checkpoint_factory(arch, num_heads=4, num_kv_heads=2)
    hf_config = load_hf_config(resolve_model(str(folder)))
    cls = get_model_class(hf_config)
    model = cls(cls.config_from_hf(hf_config), TorchReferenceBackend(), max_position=64)
    from inferneo.model_executor.models.interface import CausalLM

    assert isinstance(model, CausalLM)
    assert model.num_kv_heads == 2
    model.cast(torch.bfloat16)  # weights take the dtype; rotary tables stay in float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.cos_cache.dtype == torch.float32 for m in model.modules() if hasattr(m, "cos_cache"))
