"""Host buffers for step inputs and their single copy to the device.

On CPU the packed numpy buffer *is* the input: tensors are views of it, nothing is copied. On CUDA two pinned
buffers alternate; each step's buffer goes to the device in one non-blocking copy, and a buffer is only
rewritten once the copy that last read it has finished (an event per buffer), so steps that end without a
device-to-host sync (prefill chunks with nothing to sample) cannot race the copy engine.
"""

from __future__ import annotations

import numpy as np
import torch


class InputStager:
    """Reusable host buffers (pinned on CUDA) and a device staging tensor for packed step inputs."""

    def __init__(self, device: torch.device, initial: int = 1 << 16) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        count = 2 if self.on_cuda else 1
        self._host: list[torch.Tensor] = [self._alloc_host(initial) for _ in range(count)]
        self._events: list[torch.cuda.Event | None] = [None] * count
        self._index = 0
        self._device_buf: torch.Tensor | None = None

    def _alloc_host(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.int64, pin_memory=self.on_cuda)

    def host(self, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """A host buffer of at least ``size`` int64, as numpy array and tensor over the same memory."""
        if self.on_cuda:
            self._index = (self._index + 1) % len(self._host)
            event = self._events[self._index]
            if event is not None:
                event.synchronize()
        buf = self._host[self._index]
        if buf.numel() < size:
            buf = self._alloc_host(max(size, 2 * buf.numel()))
            self._host[self._index] = buf
        return buf.numpy(), buf

    def upload(self, host: torch.Tensor, size: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``size`` elements on the device: a view on CPU, else one async copy (into ``target``)."""
        if not self.on_cuda:
            return host[:size]
        if target is None:
            if self._device_buf is None or self._device_buf.numel() < size:
                grown = max(size, 2 * self._device_buf.numel()) if self._device_buf is not None else size
                self._device_buf = torch.empty(grown, dtype=torch.int64, device=self.device)
            target = self._device_buf
        target[:size].copy_(host[:size], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[self._index] = event
        return target if target is not self._device_buf else target[:size]
