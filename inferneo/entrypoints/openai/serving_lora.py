"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's bodies), and the adapters' model
cards in ``/v1/models``.

Loading checks the adapter against the model before it is served (400 naming the field that is wrong; with
``load_inplace`` a name already in use takes the new adapter, under a new id, as vLLM does);
unloading stops new requests from using the name (404 for an unknown one), while requests already running with
it finish. The engine reads an adapter when the first request naming it arrives and pages it out by itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import Field

from inferneo.entrypoints.openai.errors import APIError, bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import MAX_MODEL_CHARS, _Body
from inferneo.entrypoints.openai.serving_common import ServerContext
from inferneo.lora.adapter import LoRAAdapterError
from inferneo.lora.registry import LoRANotFoundError


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(max_length=MAX_MODEL_CHARS)
    lora_path: str = Field(max_length=MAX_MODEL_CHARS)
    # vLLM's: a name already loaded now serves the adapter at lora_path (a new version of it), instead of a 400
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(max_length=MAX_MODEL_CHARS)
    lora_int_id: int | None = None


def install_lora_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Add the adapter endpoints to ``app`` (they answer 400 when the server runs without ``--enable-lora``)."""

    def registry():
        if ctx.loras is None:
            raise bad_request("LoRA adapters are off: start the server with --enable-lora", "lora_name")
        return ctx.loras

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        loras = registry()
        try:  # reading the adapter's weights to check them takes a moment: off the event loop
            await asyncio.to_thread(loras.add, body.lora_name, body.lora_path, replace=body.load_inplace)
        except LoRAAdapterError as exc:
            raise bad_request(str(exc), exc.param) from None
        except ValueError as exc:
            raise to_api_error(exc) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        loras = registry()
        ref = loras.get(body.lora_name)
        if ref is not None and body.lora_int_id is not None and body.lora_int_id != ref.lora_id:
            raise bad_request(f"lora_int_id {body.lora_int_id} is not the id of adapter '{body.lora_name}' "
                              f"({ref.lora_id})", "lora_int_id")
        try:
            loras.remove(body.lora_name)
        except LoRANotFoundError as exc:
            raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def lora_model_cards(ctx: ServerContext, card) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the loaded adapters: ``card(name)`` with the adapter's folder as ``root`` and the
    base model (or the ``base_model_name`` its ``--lora-modules`` entry gave) as ``parent``."""
    if ctx.loras is None:
        return []
    # a snapshot first: /v1/load_lora_adapter adds adapters from a worker thread, which may run between two cards
    adapters, parents = list(ctx.loras.adapters.items()), dict(ctx.loras.base_model_names)
    return [card(ctx, name) | {"root": ref.path, "parent": parents.get(name, ctx.served_model_names[0])}
            for name, ref in adapters]
