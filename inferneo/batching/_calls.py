"""Where the batching tools' calls run, so that they can be cancelled: on an event loop of their own thread (a batch
cancelled there closes its connection, and the server stops generating for it), or, for a client that sends through
an ``http_client`` of the caller's, on worker threads (a batch cancelled before it starts is not sent; one already
sent runs to its end).

Both block SIGINT and SIGTERM in their threads, so that Ctrl-C reaches the caller's thread at once: a signal the
kernel handed to one of them would only be seen once the caller's thread woke up for another reason.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from inferneo.batching._core import Outcome, Prompt, acomplete_batch, complete_batch
from inferneo.client import AsyncInferneoClient, InferneoClient

CLOSE_TIMEOUT = 30.0


def block_signals() -> None:
    """Keep SIGINT and SIGTERM off the calling thread (a worker's), so that the kernel hands them to the caller's."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class LoopCalls:
    """Batch calls on an event loop of their own thread, through an async twin of ``client`` (same address, key,
    timeout, retries and headers), at most ``limit`` at once. Cancelling a call's future cancels its task, which
    closes its connection, so the server stops generating for it."""

    def __init__(self, client: InferneoClient, limit: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.limit = limit
        self._gate: asyncio.Semaphore | None = None  # made on the loop
        self.thread = threading.Thread(target=self._run, name="inferneo-batch-calls", daemon=True)
        self.thread.start()
        self.client = AsyncInferneoClient(**client._options())

    def _run(self) -> None:
        block_signals()
        self.loop.run_forever()

    def submit(
        self, model: str | None, batch: list[Prompt], params: Mapping[str, Any]
    ) -> Future[list[Outcome]]:
        """Start one batched call; its future resolves to each prompt's outcome."""
        return asyncio.run_coroutine_threadsafe(self._call(model, batch, params), self.loop)

    async def _call(self, model: str | None, batch: list[Prompt], params: Mapping[str, Any]) -> list[Outcome]:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.limit)
        async with self._gate:
            return await acomplete_batch(self.client, model, batch, params)

    def close(self, cancel: list[Future[list[Outcome]]], wait: bool = True) -> None:
        """Cancel the calls in ``cancel``, let the others finish, then close the client and stop the thread: at once
        (waiting until the cancelled calls have closed their connections), or, without ``wait``, in the background
        once the calls still running have ended."""
        for future in cancel:
            future.cancel()  # cancels its task on the loop
        drained = asyncio.run_coroutine_threadsafe(self._drain(), self.loop)
        if not wait:
            drained.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))
            return
        try:
            drained.result(CLOSE_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLOSE_TIMEOUT)
            if not self.thread.is_alive():
                self.loop.close()

    async def _drain(self) -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        await self.client.close()


class ThreadCalls:
    """Batch calls on ``limit`` worker threads through ``client`` itself (one made on an ``http_client`` of the
    caller's): cancelling drops the calls not yet started; one already sent runs to its end."""

    def __init__(self, client: InferneoClient, limit: int) -> None:
        self.client = client
        self.pool = ThreadPoolExecutor(
            limit, thread_name_prefix="inferneo-batch-calls", initializer=block_signals
        )

    def submit(
        self, model: str | None, batch: list[Prompt], params: Mapping[str, Any]
    ) -> Future[list[Outcome]]:
        """Start one batched call; its future resolves to each prompt's outcome."""
        return self.pool.submit(complete_batch, self.client, model, batch, params)

    def close(self, cancel: list[Future[list[Outcome]]], wait: bool = True) -> None:
        """Cancel the calls in ``cancel`` (those not started yet), and stop the threads once the others end (waiting
        for them with ``wait`` unless something was cancelled)."""
        for future in cancel:
            future.cancel()
        self.pool.shutdown(wait=wait and not cancel, cancel_futures=bool(cancel))


def calls_for(client: InferneoClient, limit: int) -> LoopCalls | ThreadCalls:
    """Cancellable calls (:class:`LoopCalls`) for a client on a connection pool of its own, worker threads for one on
    an ``http_client`` of the caller's (its transport may be anything)."""
    return LoopCalls(client, limit) if getattr(client, "_plain_pool", False) else ThreadCalls(client, limit)
