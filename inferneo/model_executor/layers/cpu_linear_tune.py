"""The start-up choice of a CPU linear kernel per layer shape: the candidates this CPU has, then a short measure.

``cpu_select.candidate_kernels`` names the kernels a CPU can run for a dtype and shape, best guess first. Where
more than one of them runs here, :class:`LinearChooser` times each on the model's own layers at a decode row count
and a prefill row count (the candidates interleaved, the best of a few passes kept), picks the one with the lowest
geometric mean of its time over the best at each row count (the first candidate unless another is more than 5%
faster), and stores the answer in the tune cache
(``inferneo.kernels.cpu_tune_cache``), keyed by the CPU model and flags, the PyTorch version, the thread count,
the dtype and the shape. The choice for each dtype is logged once per process.

Decode steps stream every weight from memory, so a decode pass runs over as many layers of the shape as fill twice
the last-level cache (a weight that stays in cache would flatter the kernels that do not prefetch); a prefill
pass is bound by arithmetic and runs over one layer. An output head only ever sees decode rows (one row per
sampled sequence).

Switches (``KernelConfig``): ``cpu_linear_kernel`` (``INFERNEO_CPU_LINEAR_KERNEL``) forces a kernel where it runs;
``cpu_linear_tune`` (``INFERNEO_CPU_LINEAR_TUNE``) off takes the first candidate that runs, measuring nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu import native_source_digest
from inferneo.kernels.cpu_features import CpuFeatures, cpu_features
from inferneo.kernels.cpu_select import LinearKernel, LinearShape, candidate_kernels
from inferneo.kernels.cpu_tune_cache import TuneCache, TuneKey, TuneResult

logger = logging.getLogger(__name__)

#: Rows of the measured decode step (a batch of running requests) and prefill step (one MLP pass of a prompt chunk:
#: the MLP runs long prompts 128-256 rows at a time, ``cpu_linear.mlp_row_chunk``).
DECODE_ROWS = 32
PREFILL_ROWS = 256
#: Timed passes per candidate and row count, after one untimed warm-up pass; the fastest pass counts.
TIMED_PASSES = 3
#: How much faster (geometric mean over the row counts) a kernel must measure to replace the CPU's first candidate.
MARGIN = 1.05

Build = Callable[[LinearKernel, nn.Linear], nn.Module]
Runnable = Callable[[LinearKernel, torch.dtype], bool]

_logged: set[str] = set()


@dataclass(slots=True)
class Choice:
    """The kernel chosen for one shape and how (``measured``, ``cached``, ``forced``, ``only`` or ``tune off``)."""

    shape: LinearShape
    kernel: LinearKernel
    how: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    rows: tuple[int, ...] = ()


class LinearChooser:
    """Chooses a kernel per (dtype, shape) for one model's CPU linears (see the module doc)."""

    def __init__(self, kernels: KernelConfig, runnable: Runnable, *, features: CpuFeatures | None = None,
                 cache: TuneCache | None = None, decode_rows: int = DECODE_ROWS,
                 prefill_rows: int = PREFILL_ROWS) -> None:
        self.kernels = kernels
        self.runnable = runnable
        self.features = features or cpu_features()
        self.cache = cache or TuneCache()
        self.decode_rows, self.prefill_rows = decode_rows, prefill_rows
        self.choices: dict[torch.dtype, list[Choice]] = {}

    def candidates(self, dtype: torch.dtype, shape: LinearShape) -> list[LinearKernel]:
        """The kernels for ``shape`` that this CPU has and that were built here, best guess first."""
        listed = candidate_kernels(self.features, dtype, shape, native_linear=self.kernels.cpu_native_linear)
        return [kernel for kernel in listed if self.runnable(kernel, dtype)]

    def choose(self, dtype: torch.dtype, shape: LinearShape, layers: list[nn.Linear], build: Build, *,
               head: bool = False, allowed: Callable[[LinearKernel], bool] = lambda kernel: True) -> LinearKernel:
        """The kernel for the linears ``layers`` (all of ``shape`` and ``dtype``); ``build(kernel, linear)`` makes
        the module a kernel runs as; ``head``: an output head (decode rows only); ``allowed`` drops candidates."""
        candidates = [kernel for kernel in self.candidates(dtype, shape) if allowed(kernel)]
        choice = self._choose(dtype, shape, candidates, layers, build, head)
        self.choices.setdefault(dtype, []).append(choice)
        return choice.kernel

    def _choose(self, dtype, shape, candidates, layers, build, head) -> Choice:
        forced = self.kernels.cpu_linear_kernel
        if forced != "auto":
            if LinearKernel(forced) in candidates:
                return Choice(shape, LinearKernel(forced), "forced")
            _warn_once(f"INFERNEO_CPU_LINEAR_KERNEL={forced} cannot run {dtype_name(dtype)} {shape} layers here "
                       f"(candidates: {', '.join(k.value for k in candidates)}); choosing among those")
        if len(candidates) == 1:
            return Choice(shape, candidates[0], "only")
        if not self.kernels.cpu_linear_tune:
            return Choice(shape, candidates[0], "tune off")
        rows = (self.decode_rows,) if head else (self.decode_rows, self.prefill_rows)
        key = TuneKey(self.features.model, self.features.summary(), torch.__version__, native_source_digest(),
                      torch.get_num_threads(), dtype_name(dtype), str(shape), rows, tuple(k.value for k in candidates))
        cached = self.cache.get(key)
        if cached is not None:
            return Choice(shape, LinearKernel(cached.kernel), "cached", cached.seconds, rows)
        seconds = measure(candidates, layers, build, rows)
        kernel = fastest(seconds)
        timed = {k.value: times for k, times in seconds.items()}
        self.cache.put(key, TuneResult(kernel.value, timed))
        return Choice(shape, kernel, "measured", timed, rows)

    def log(self) -> None:
        """Log this CPU and the choice for each dtype, once per process for each distinct message."""
        _info_once(f"CPU: {self.features.model}, features {self.features.summary()}")
        for dtype, choices in self.choices.items():
            _info_once(describe(dtype, choices))


def measure(candidates: list[LinearKernel], layers: list[nn.Linear], build: Build,
            rows: tuple[int, ...]) -> dict[LinearKernel, list[float]]:
    """Seconds per layer call of each candidate at each row count: the decode count over the ``layers`` given (the
    caller passes enough to stream from memory), the others over the first; candidates interleaved pass by pass,
    the fastest of :data:`TIMED_PASSES` passes kept."""
    weight = layers[0].weight
    inputs = [torch.randn(count, weight.shape[1], dtype=weight.dtype) for count in rows]
    with torch.no_grad():
        modules = {}
        for kernel in candidates:
            try:
                modules[kernel] = [build(kernel, layer) for layer in layers]
                modules[kernel][0](inputs[0])
            except RuntimeError as exc:  # a kernel this CPU was expected to run, failing here: leave it out
                _warn_once(f"CPU linear kernel {kernel.value} failed on a {weight.dtype} layer, left out: {exc}")
                modules.pop(kernel, None)
        candidates = list(modules)
        best = {kernel: [math.inf] * len(rows) for kernel in candidates}
        for round_ in range(TIMED_PASSES + 1):
            order = candidates[round_ % len(candidates):] + candidates[: round_ % len(candidates)]
            for kernel in order:
                for index, x in enumerate(inputs):
                    passed = modules[kernel] if index == 0 else modules[kernel][:1]
                    start = time.perf_counter()
                    for module in passed:
                        module(x)
                    elapsed = (time.perf_counter() - start) / len(passed)
                    if round_:  # the first round warms caches and page tables up
                        best[kernel][index] = min(best[kernel][index], elapsed)
    return best


def fastest(seconds: dict[LinearKernel, list[float]]) -> LinearKernel:
    """The kernel with the lowest geometric mean of its time over the best time at each row count; the first
    listed (the best guess) unless another beats it by more than :data:`MARGIN` (a closer call is noise)."""
    kernels = list(seconds)
    columns = range(len(next(iter(seconds.values()))))
    best = [min(seconds[k][i] for k in kernels) for i in columns]

    def score(kernel: LinearKernel) -> float:  # log of the geometric mean of time / best
        return sum(math.log(seconds[kernel][i] / best[i]) for i in columns if best[i] > 0) / len(columns)

    winner = min(kernels, key=score)
    return winner if score(kernels[0]) - score(winner) > math.log(MARGIN) else kernels[0]


def decode_sample(layers: list[nn.Linear], cache_bytes: int | None = None) -> list[nn.Linear]:
    """The first layers of ``layers`` whose weights together fill twice the last-level cache (all of them when
    they do not), so that a decode pass over them streams the weights from memory as the engine's steps do. A
    single layer more than twice that size (an output head) is timed on a slice of its leading output rows (a view,
    not a copy), so that the candidates' packed copies stay small."""
    target = 2 * (cache_bytes if cache_bytes is not None else last_level_cache_bytes())
    sample, total = [], 0
    for layer in layers:
        size = layer.weight.numel() * layer.weight.element_size()
        if not sample and size > 2 * target:
            row_bytes = layer.in_features * layer.weight.element_size()
            return [_leading_rows(layer, max(64, target // row_bytes // 64 * 64))]
        sample.append(layer)
        total += size
        if total >= target:
            break
    return sample


def _leading_rows(layer: nn.Linear, rows: int) -> nn.Linear:
    """A linear over the first ``rows`` output rows of ``layer``'s weight and bias (views)."""
    proxy = nn.Linear(layer.in_features, rows, bias=layer.bias is not None, device="meta")
    proxy.weight = nn.Parameter(layer.weight.detach()[:rows], requires_grad=False)
    if layer.bias is not None:
        proxy.bias = nn.Parameter(layer.bias.detach()[:rows], requires_grad=False)
    return proxy


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(dtype: torch.dtype, choices: list[Choice]) -> str:
    """One log line: the kernel chosen for each ``dtype`` shape and how, with the measured milliseconds."""
    by_kernel: dict[LinearKernel, list[Choice]] = {}
    for choice in choices:
        by_kernel.setdefault(choice.kernel, []).append(choice)
    parts = []
    for kernel, chosen in by_kernel.items():
        shapes = "; ".join(_shape_note(choice) for choice in chosen)
        parts.append(f"{kernel.value} ({shapes})")
    return f"linear kernel for {dtype_name(dtype)}: " + ", ".join(parts)


def _shape_note(choice: Choice) -> str:
    if not choice.seconds:
        return f"{choice.shape}: {choice.how}"
    rows = "/".join(str(r) for r in choice.rows)
    times = ", ".join(f"{name} " + "/".join(f"{t * 1e3:.3g}" for t in ts) for name, ts in choice.seconds.items())
    return f"{choice.shape}: {choice.how}, ms per call at {rows} rows: {times}"


def _info_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info("%s", message)


def _warn_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("%s", message)
