"""The package's layering, read from its source: no import cycles between the layers, no forbidden edges.

Every ``import`` statement counts, including those inside functions (a lazy import is still a dependency) but
not those under ``if TYPE_CHECKING:``,
except in the root package's facade (``inferneo/__init__.py``, whose ``LLM`` and ``SamplingParams`` are
imported on first use). That the client does not import torch is also checked by importing it.
The layers (``LAYERS``) and the edges they may not have (``FORBIDDEN``) are the ones docs/architecture.md
draws: the client never reaches torch, the core never reaches the front end or the server, the worker and the
model files never reach the core.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from source_ast import parse_file

import inferneo

PACKAGE_ROOT = Path(inferneo.__file__).parent

# Module-name prefixes of each layer (the longest matching prefix decides).
LAYERS = {
    "client": ("inferneo.client", "inferneo.batching"),
    "core": ("inferneo.engine.core", "inferneo.engine.core_loop", "inferneo.engine.core_builder",
             "inferneo.engine.core_process", "inferneo.engine.scheduler", "inferneo.engine.kv_cache_manager",
             "inferneo.engine.request"),
    "contract": ("inferneo.engine.protocol",),
    "core_clients": ("inferneo.engine.core_client",),
    "front_end": ("inferneo.engine.llm_engine", "inferneo.engine.async_engine", "inferneo.engine.input_processor",
                  "inferneo.engine.output_processor", "inferneo.engine.detokenizer",
                  "inferneo.engine.request_group", "inferneo.entrypoints.llm"),
    "server": ("inferneo.entrypoints.openai", "inferneo.entrypoints.anthropic"),
    "worker": ("inferneo.worker",),
    "sampling": ("inferneo.sampling",),
    "models": ("inferneo.model_executor",),
    "cli": ("inferneo.cli", "inferneo.cli_batch", "inferneo.cli_bench", "inferneo.extras"),
}

# (from layer, to layer or top-level package): imports that must not exist.
FORBIDDEN = {
    ("client", "torch"),
    ("client", "server"), ("client", "front_end"), ("client", "core"), ("client", "worker"),
    ("core", "server"), ("core", "front_end"), ("core", "core_clients"),
    ("contract", "core"), ("contract", "front_end"), ("contract", "worker"), ("contract", "server"),
    ("front_end", "server"),
    ("worker", "core"), ("worker", "front_end"), ("worker", "server"), ("worker", "core_clients"),
    ("sampling", "core"), ("sampling", "front_end"), ("sampling", "server"),
    ("models", "core"), ("models", "front_end"), ("models", "server"), ("models", "worker"),
}

# Layers between which no import cycle may exist (a cycle among modules of one layer is checked below too).
ACYCLIC_LAYERS = ("core", "core_clients", "front_end", "worker", "sampling", "cli", "contract")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(parse_file(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for type checkers only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and (getattr(test, "id", None) == "TYPE_CHECKING"
                                     or getattr(test, "attr", None) == "TYPE_CHECKING"):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules (of this package) and top-level packages it imports."""
    paths = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        if name == "inferneo":  # the facade: re-exports, imported lazily
            continue
        targets = set()
        for imported in imports_of(path, name):
            if imported.startswith("inferneo"):
                # "from inferneo.x import y": y may be a module or a name in x; keep whichever is a module.
                while imported not in paths and "." in imported:
                    imported = imported.rpartition(".")[0]
                if imported in paths and imported not in (name, "inferneo"):
                    targets.add(imported)
            else:
                targets.add(imported.partition(".")[0])
        graph[name] = targets
    return graph


def layer_of(name: str) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "inferneo.engine.core_loop" in graph["inferneo.engine.core_client"]
    assert "torch" in graph["inferneo.engine.core_builder"]
    assert layer_of("inferneo.engine.core_loop") == "core" and layer_of("inferneo.engine.core_client") == (
        "core_clients")


def test_no_forbidden_edges():
    graph = import_graph()
    bad = []
    for name, targets in sorted(graph.items()):
        source = layer_of(name)
        for target in sorted(targets):
            if (source, layer_of(target) or target) in FORBIDDEN:
                bad.append(f"{name} -> {target}")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_the_client_never_reaches_torch():
    graph = import_graph()
    for name in graph:
        if layer_of(name) == "client":
            assert "torch" not in reachable(graph, name), f"{name} reaches torch through its imports"


def test_no_import_cycles_among_the_layers():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if any(layer_of(m) in ACYCLIC_LAYERS for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
    layer_edges: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph.items():
        source = layer_of(name)
        for target in targets:
            dest = layer_of(target)
            if source in ACYCLIC_LAYERS and dest in ACYCLIC_LAYERS and source != dest:
                layer_edges[source].add(dest)
    layer_cycles = strongly_connected(dict(layer_edges) | {k: set() for k in ACYCLIC_LAYERS if k not in layer_edges})
    assert not layer_cycles, f"layers import each other: {layer_cycles}"


def test_importing_the_client_does_not_import_torch():
    code = ("import sys, inferneo, inferneo.client, inferneo.batching, inferneo.batch.records; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_the_checker_finds_a_cycle_and_a_forbidden_edge():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert ("worker", "core") in FORBIDDEN and layer_of("inferneo.worker.model_runner") == "worker"
