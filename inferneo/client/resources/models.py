"""``client.models``: ``GET /v1/models`` and ``GET /v1/models/{name}``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from inferneo.client.types import Model, ModelList

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout


class Models:
    """The model names the server answers to."""

    def __init__(self, client: SyncAPIClient) -> None:
        self._client = client

    def list(self, *, timeout: Timeout | None = None) -> ModelList:
        """Every served model name (the first is the server's main one); iterate the answer or read ``.data``."""
        return self._client.request("GET", "/models", ModelList, timeout=timeout)

    def retrieve(self, model: str, *, timeout: Timeout | None = None) -> Model:
        """One served model; :class:`~inferneo.client.errors.NotFoundError` for a name the server does not know."""
        return self._client.request("GET", f"/models/{quote(model, safe='/')}", Model, timeout=timeout)


class AsyncModels:
    """The async twin of :class:`Models`."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self._client = client

    async def list(self, *, timeout: Timeout | None = None) -> ModelList:
        """Every served model name; see :meth:`Models.list`."""
        return await self._client.request("GET", "/models", ModelList, timeout=timeout)

    async def retrieve(self, model: str, *, timeout: Timeout | None = None) -> Model:
        """One served model; see :meth:`Models.retrieve`."""
        return await self._client.request("GET", f"/models/{quote(model, safe='/')}", Model, timeout=timeout)
