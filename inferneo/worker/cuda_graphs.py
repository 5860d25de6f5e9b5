"""CUDA graphs for decode-only steps, one per batch-size bucket, all sharing one memory pool.

A decode step of ``n`` requests runs the graph of the smallest bucket ``>= n``; the rows in between are padding
(see ``step_inputs``: they write to and read from the spare KV block). Prefill and mixed steps, and decode
batches larger than the largest bucket, run eagerly. The graphs read their inputs from one static int64 device
tensor laid out like the host buffer (``Layout``), so feeding a graph is a single host-to-device copy.
Logits and sampling stay outside the graphs.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.worker.step_inputs import Layout

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256


def decode_buckets(max_num_seqs: int, largest: int = MAX_GRAPH_BATCH) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, then every multiple of 8, up to ``min(max_num_seqs, largest)`` (always included)."""
    cap = max(1, min(max_num_seqs, largest))
    sizes = [b for b in (1, 2, 4) if b < cap] + list(range(8, cap + 1, 8))
    if not sizes or sizes[-1] != cap:
        sizes.append(cap)
    return sorted(set(sizes))


def pick_bucket(buckets: list[int], batch: int) -> int | None:
    """The smallest bucket that holds ``batch`` rows, or None when ``batch`` exceeds the largest."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


def graph_layout(buckets: list[int], max_blocks_per_seq: int) -> Layout:
    """The fixed layout every graph reads: room for the largest bucket and full-length block tables."""
    largest = buckets[-1]
    return Layout(tokens=largest, rows=largest, samples=largest, width=max_blocks_per_seq)


class DecodeGraphs:
    """Captures and replays the model's forward pass for decode-only batches."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 buckets: list[int], block_size: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device, spare_block: int) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.buckets = buckets
        self.block_size = block_size
        self.layout = graph_layout(buckets, max_blocks_per_seq)
        self.inputs = torch.zeros(self.layout.size, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(buckets[-1], hidden_size, dtype=dtype, device=device)
        self.spare_block = spare_block
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, AttentionMetadata]] = {}
        self.pool = None

    def views(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and attention metadata over the static inputs for ``batch`` rows."""
        lo, x = self.layout, self.inputs
        metadata = AttentionMetadata(
            block_size=self.block_size,
            num_decode_tokens=batch,
            slot_mapping=x[lo.slots : lo.slots + batch],
            decode_block_tables=x[lo.tables : lo.tables + batch * lo.width].view(batch, lo.width),
            decode_seq_lens=x[lo.seq_lens : lo.seq_lens + batch],
            prefills=[],
        )
        return x[lo.ids : lo.ids + batch], x[lo.positions : lo.positions + batch], metadata

    def _fill_padding(self) -> None:
        """Every row a padding row: valid inputs for the warm-up and capture runs."""
        lo, x = self.layout, self.inputs
        x.zero_()
        x[lo.slots : lo.slots + lo.rows] = self.spare_block * self.block_size
        x[lo.seq_lens : lo.seq_lens + lo.rows] = 1
        x[lo.tables : lo.tables + lo.rows * lo.width].view(lo.rows, lo.width)[:, 0] = self.spare_block

    def _run(self, batch: int) -> None:
        if batch not in self._views:
            self._views[batch] = self.views(batch)
        ids, positions, metadata = self._views[batch]
        metadata.extra = {}
        self.backend.prepare(metadata)
        self.hidden[:batch] = self.model(ids, positions, self.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, into one shared memory pool."""
        start = time.perf_counter()
        self._fill_padding()
        torch.cuda.synchronize()
        for batch in reversed(self.buckets):
            self._run(batch)  # warm-up: cuBLAS handles, Triton compilation, lazy allocations
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._run(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self._graphs[batch] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self._graphs),
                    self.buckets[0], self.buckets[-1], time.perf_counter() - start)

    def release(self) -> None:
        """Destroy the graphs and drop their memory pool.

        Needed before a tensor-parallel group is torn down: NCCL keeps a communicator alive while any graph that
        captured one of its collectives exists, so destroying the group first waits forever.
        """
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._views.clear()
        self.pool = None

    def replay(self, batch: int) -> torch.Tensor:
        """Run the graph of bucket ``batch`` on the current static inputs; returns its hidden states."""
        self._graphs[batch].replay()
        return self.hidden[:batch]
