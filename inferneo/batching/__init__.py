"""Batching tools over the client: the patterns of the batching guide, done once and tested.

- :class:`DynamicBatcher`: submit prompts one at a time, get futures; batches form by size or by waiting time.
- :class:`AdaptiveBatchSizer` / :class:`AdaptiveBatcher`: batch sizes from measured throughput and errors.
- :func:`stream_batches` / :func:`astream_batches`: an iterable of any length, bounded memory, results in order.

Every tool answers each prompt with a :class:`BatchResult` (its choices, or its own error). Priority is a
parameter like any other (``priority=-1`` is served before ``priority=0`` by a server started with
``--scheduling-policy priority``).
"""

from inferneo.batching._core import BatchResult, acomplete_batch, complete_batch
from inferneo.batching.adaptive import AdaptiveBatcher, AdaptiveBatchSizer
from inferneo.batching.dynamic import DynamicBatcher
from inferneo.batching.streaming import astream_batches, stream_batches

__all__ = ["AdaptiveBatchSizer", "AdaptiveBatcher", "BatchResult", "DynamicBatcher", "acomplete_batch",
           "astream_batches", "complete_batch", "stream_batches"]
