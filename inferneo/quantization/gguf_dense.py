"""Where a wide16 GGUF layer's prompt-sized calls de-quantize the weight and run one dense matmul instead.

The wide16 kernels (``csrc/gguf_packed.cpp``) multiply 4-bit weights in their own panels, with the CPU's vector dot
products (AVX512_BF16 ``vdpbf16ps`` for bfloat16 activations). On a CPU with AMX-BF16 only oneDNN reaches the tile
units, so above some row count it pays to de-quantize the whole weight once per call into a bfloat16 ``[K, N]``
matrix (``gguf_packed_dequantize_kn``: the same values the bfloat16 panels hold) and hand it to ``torch.mm``. Where
that row count lies depends on the CPU, so it is measured at load on the layer's own shape, as the dense linear
kernels are (``model_executor/layers/cpu_linear_tune.py``), and kept in the same tune cache.

The candidates follow the CPU's features (:func:`dense_candidate`): only bfloat16 activations on AMX-BF16 CPUs
get the dense path. Elsewhere both paths use the same dot-product instruction and the panels skip the de-quantized
copy: on a Zen 5 (AVX512_BF16, no AMX) the dense path measured 0.47-0.91x the panels at 64-1024 rows in bfloat16
and 0.30-0.43x in float32 (docs/benchmarks.md, "Zen 5 host, 2026-12-04 evening"), so it is not offered there.
``INFERNEO_CPU_LINEAR_KERNEL=onednn`` / ``panel`` force one path where it can run; ``INFERNEO_CPU_LINEAR_TUNE=0``
takes the CPU's first candidate (dense, on AMX) without measuring.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu_features import CpuFeatures, cpu_features
from inferneo.kernels.cpu_gguf import gguf_source_digest
from inferneo.kernels.cpu_tune_cache import TuneCache, TuneKey, TuneResult

logger = logging.getLogger(__name__)

#: The prompt-sized row counts measured; the dense path runs from the smallest one at which it wins (and wins at
#: every larger one), never below it.
ROWS = (256, 1024)
#: How much faster the dense path must measure at a row count to win it (a closer call is noise).
MARGIN = 1.05
TIMED_PASSES = 3
PANEL, DENSE = "wide16", "dense"

# A path's call at a row count: (x [rows, K]) -> y [rows, N]
Call = Callable[[torch.Tensor], torch.Tensor]

_memo: dict[tuple, int | None] = {}
_logged: set[str] = set()


def dense_candidate(features: CpuFeatures, dtype: torch.dtype) -> bool:
    """Whether the dense path is a candidate for ``dtype`` activations on a CPU with ``features``: bfloat16 on
    AMX-BF16 (the tile units that only oneDNN uses)."""
    return dtype == torch.bfloat16 and features.amx_bf16


def dense_from_rows(ops, tiles: torch.Tensor, qtype: int, out_features: int, dtype: torch.dtype,
                    kernels: KernelConfig, *, features: CpuFeatures | None = None,
                    cache: TuneCache | None = None) -> int | None:
    """The row count from which a wide16 layer of this shape runs the dense path, or None (the panels at every
    row count). Measured once per shape and process, and kept in the tune cache across processes."""
    features = features or cpu_features()
    if not dense_candidate(features, dtype):
        return None
    forced = kernels.cpu_linear_kernel
    if forced in ("onednn", "panel"):
        return ROWS[0] if forced == "onednn" else None
    if not kernels.cpu_linear_tune:
        return ROWS[0]  # the AMX CPU's first guess, as for dense layers
    in_features = tiles.shape[1] * 32
    shape = f"gguf-wide16 q{qtype} {out_features}x{in_features}"
    memo_key = (shape, dtype, torch.get_num_threads())
    if memo_key in _memo:
        return _memo[memo_key]
    key = TuneKey(features.model, features.summary(), torch.__version__, gguf_source_digest(),
                  torch.get_num_threads(), str(dtype).removeprefix("torch."), shape, ROWS, (PANEL, DENSE))
    cache = cache or TuneCache()
    cached = cache.get(key)
    if cached is not None:
        seconds = cached.seconds
    else:
        seconds = measure({
            PANEL: lambda x: ops.gguf_packed_linear(x, tiles, qtype, out_features),
            DENSE: lambda x: torch.mm(x, ops.gguf_packed_dequantize_kn(tiles, qtype, out_features, x.dtype)),
        }, in_features, dtype)
    start = first_winning_rows(seconds)
    if cached is None:
        cache.put(key, TuneResult(DENSE if start is not None else PANEL, seconds))
    _memo[memo_key] = start
    _log_once(f"GGUF layers {shape} ({str(dtype).removeprefix('torch.')}): "
              + (f"de-quantized into one oneDNN matmul from {start} rows" if start is not None
                 else "wide16 panels at every row count")
              + f" ({'cached' if cached is not None else 'measured'}: "
              + ", ".join(f"{rows} rows {seconds[PANEL][i] * 1e3:.2f} / {seconds[DENSE][i] * 1e3:.2f} ms"
                          for i, rows in enumerate(ROWS)) + " panels / dense)")
    return start


def measure(calls: dict[str, Call], in_features: int, dtype: torch.dtype) -> dict[str, list[float]]:
    """Seconds per call of each path at each of :data:`ROWS`: the paths interleaved, one untimed pass first, the
    fastest of :data:`TIMED_PASSES` kept."""
    inputs = [torch.randn(rows, in_features).to(dtype) for rows in ROWS]
    best = {name: [math.inf] * len(ROWS) for name in calls}
    with torch.no_grad():
        for pass_ in range(TIMED_PASSES + 1):
            for name, call in calls.items():
                for index, x in enumerate(inputs):
                    start = time.perf_counter()
                    call(x)
                    if pass_:
                        best[name][index] = min(best[name][index], time.perf_counter() - start)
    return best


def first_winning_rows(seconds: dict[str, list[float]]) -> int | None:
    """The smallest of :data:`ROWS` from which the dense path beats the panels by :data:`MARGIN` at every row
    count measured, or None."""
    start = None
    for index in reversed(range(len(ROWS))):
        if seconds[PANEL][index] > MARGIN * seconds[DENSE][index]:
            start = ROWS[index]
        else:
            break
    return start


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
