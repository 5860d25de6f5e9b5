"""Prompt embeddings as input (vLLM's ``prompt_embeds``): a prompt given as the rows the model's embedding table
would produce, ``[num_tokens, hidden_size]``, instead of as token ids.

A checked tensor (:func:`check_prompt_embeds`; the server first reads it from base64 with
:func:`decode_prompt_embeds`, never unpickling anything but tensors) crosses to the core as a
:class:`PromptEmbeds` record: its raw bytes, shape and element type, and a digest. The core schedules it as a prompt
of placeholder tokens (:data:`PLACEHOLDER_TOKEN_ID`, never shown to the user); the runner writes the rows in place of
those tokens' embeddings, a prompt chunk taking its slice, and the tokens generated after it go through the
embedding table as ever. Prefix-cache blocks that hold embedding rows are keyed by the digest of those rows
(:meth:`PromptEmbeds.rows_digest`), so identical embeddings share their blocks and different ones never do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io

import msgspec
import torch

# The token id that stands for each embedding row in the core's token lists (scheduling, block tables, the
# prefix cache's token check); the runner never reads it for those rows.
PLACEHOLDER_TOKEN_ID = 0

# The element types a prompt embedding crosses in; float64 is sent as float32.
_WIRE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_ACCEPTED_DTYPES = (*_WIRE_DTYPES, torch.float64)

# What a torch.save'd tensor adds to its elements (the zip archive's entries and pickled metadata) at most.
_SAVE_OVERHEAD_BYTES = 1 << 20


class PromptEmbedsError(ValueError):
    """Prompt embeddings that cannot be used (the caller's error: a 400 for the server)."""


class PromptEmbeds(msgspec.Struct, array_like=True, frozen=True):
    """One prompt's embeddings on their way to the core: ``shape`` is ``(num_tokens, hidden_size)``, ``data`` the
    elements in C order as ``dtype`` (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""

    data: bytes
    shape: tuple[int, int]
    dtype: str
    digest: str  # sha256 of the element type, shape and elements: the same embeddings, the same digest

    @classmethod
    def from_tensor(cls, embeds: torch.Tensor) -> PromptEmbeds:
        """The record of a tensor that :func:`check_prompt_embeds` returned."""
        embeds = embeds.detach().cpu().contiguous()
        if embeds.dtype not in _WIRE_DTYPES:
            embeds = embeds.to(torch.float32)
        dtype = _WIRE_DTYPES[embeds.dtype]
        data = embeds.view(torch.uint8).numpy().tobytes()
        shape = (int(embeds.shape[0]), int(embeds.shape[1]))
        digest = hashlib.sha256(f"{dtype}{shape}".encode() + data).hexdigest()
        return cls(data, shape, dtype, digest)

    @property
    def length(self) -> int:
        """The number of prompt positions (rows)."""
        return self.shape[0]

    @property
    def _row_bytes(self) -> int:
        return len(self.data) // self.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a tensor of ``dtype`` (a copy of those rows only: a prompt chunk reads its
        slice, not the whole prompt)."""
        step = self._row_bytes
        chunk = bytearray(memoryview(self.data)[start * step : stop * step])
        return torch.frombuffer(chunk, dtype=getattr(torch, self.dtype)).reshape(stop - start, self.shape[1])

    def tensor(self) -> torch.Tensor:
        """All the rows as a tensor of ``dtype``."""
        return self.rows(0, self.length)

    def rows_digest(self, start: int, stop: int) -> str:
        """A digest of rows ``[start, stop)`` (clipped to the prompt): what keys a prefix-cache block holding them."""
        stop = min(stop, self.length)
        step = self._row_bytes
        return hashlib.sha256(memoryview(self.data)[start * step : stop * step]).hexdigest()


def check_prompt_embeds(embeds: object, hidden_size: int) -> torch.Tensor:
    """``embeds`` as a dense ``[num_tokens, hidden_size]`` float tensor on the CPU; ``PromptEmbedsError`` unless it
    is a tensor of floats (float32, float16, bfloat16 or float64) of that shape, ``[1, num_tokens, hidden_size]``
    (as a batch of one, which vLLM takes too), with at least one row and finite values. How many rows the context
    takes is the request check's (``InputProcessor.check``)."""
    if not isinstance(embeds, torch.Tensor):
        raise PromptEmbedsError(f"prompt_embeds must be a torch.Tensor of shape [num_tokens, hidden_size], got "
                                f"{type(embeds).__name__}")
    if embeds.layout is not torch.strided:
        raise PromptEmbedsError(f"prompt_embeds must be a dense tensor, got layout {embeds.layout}")
    if embeds.dtype not in _ACCEPTED_DTYPES:
        raise PromptEmbedsError(f"prompt_embeds must hold floats (float32, float16, bfloat16 or float64), got "
                                f"{str(embeds.dtype).removeprefix('torch.')}")
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2:
        raise PromptEmbedsError(f"prompt_embeds must be 2-D, [num_tokens, hidden_size], got shape "
                                f"{list(embeds.shape)}")
    if embeds.shape[0] == 0:
        raise PromptEmbedsError("prompt_embeds is empty: it needs at least one row")
    if embeds.shape[1] != hidden_size:
        raise PromptEmbedsError(f"prompt_embeds rows must have the model's hidden size {hidden_size}, got "
                                f"{embeds.shape[1]} (shape {list(embeds.shape)})")
    embeds = embeds.detach().cpu()
    if not bool(torch.isfinite(embeds).all()):
        raise PromptEmbedsError("prompt_embeds holds NaN or infinite values")
    return embeds


def max_encoded_length(max_rows: int, hidden_size: int) -> int:
    """The longest base64 text :func:`decode_prompt_embeds` reads for a prompt of at most ``max_rows`` rows: the
    rows as float64 plus ``torch.save``'s own bytes, in base64 (anything longer is refused before it is decoded)."""
    return 4 * ((max_rows * hidden_size * 8 + _SAVE_OVERHEAD_BYTES) // 3 + 1)


def decode_prompt_embeds(text: object, hidden_size: int, max_length: int) -> torch.Tensor:
    """A base64-encoded ``torch.save`` of a tensor, loaded with ``weights_only=True`` (no object but tensors is
    ever unpickled; sparse tensors are checked as they load, then refused) and checked by
    :func:`check_prompt_embeds`. ``PromptEmbedsError`` for anything else, or text longer than ``max_length``."""
    if not isinstance(text, str):
        raise PromptEmbedsError(f"prompt_embeds must be a base64 string (a torch.save'd tensor) or a list of them, "
                                f"got {type(text).__name__}")
    if len(text) > max_length:
        raise PromptEmbedsError(f"prompt_embeds is {len(text)} characters of base64; at most {max_length} are read "
                                "(the model's context length of rows)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PromptEmbedsError("prompt_embeds is not valid base64") from None
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            value = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # not a torch.save archive, or one holding objects weights_only refuses
        raise PromptEmbedsError(f"prompt_embeds is not a torch.save'd tensor: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
    return check_prompt_embeds(value, hidden_size)
