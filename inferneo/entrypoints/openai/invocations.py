"""Amazon SageMaker's two routes, as vLLM serves them: ``/ping`` (the container's health check: ``/health``'s
answer, no API key) and ``POST /invocations`` (one endpoint for every kind of request, told apart by the body's
fields, ``guards.INVOCATION_KINDS``: ``messages`` a chat completion, ``prompt`` a completion, ``query`` with
``documents`` a rerank, ``text_1`` with ``text_2`` a score, ``input`` an embedding, or for a sequence classifier
its classes). A body matching none is a 400 naming what is taken."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from inferneo.entrypoints.openai.errors import APIError, bad_request, validation_message
from inferneo.entrypoints.openai.guards import INVOCATION_KINDS, invocation_kind
from inferneo.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
)
from inferneo.entrypoints.openai.serving_chat import create_chat_completion
from inferneo.entrypoints.openai.serving_classification import create_classification
from inferneo.entrypoints.openai.serving_common import ServerContext
from inferneo.entrypoints.openai.serving_completion import create_completion
from inferneo.entrypoints.openai.serving_embedding import create_embedding
from inferneo.entrypoints.openai.serving_score import create_rerank, create_score

Handler = Callable[[ServerContext, Any, Request], Awaitable[Response]]

# each kind's request model and handler, by the fields that say what a body is
_SERVED: dict[tuple[str, ...], tuple[type[BaseModel], Handler]] = {
    ("messages",): (ChatCompletionRequest, create_chat_completion),
    ("prompt",): (CompletionRequest, create_completion),
    ("query", "documents"): (RerankRequest, create_rerank),
    ("text_1", "text_2"): (ScoreRequest, create_score),
    ("input",): (EmbeddingRequest, create_embedding),
}


def install_sagemaker_routes(app: FastAPI, ctx: ServerContext, health: Callable[[], Awaitable[Response]]) -> None:
    """``/ping`` (answered as ``health`` answers) and ``POST /invocations`` on ``app``."""

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.post("/invocations")
    async def invocations(raw: Request) -> Response:
        body = await raw.json()  # the guards have read it and checked its sizes already
        kind = invocation_kind(body) if isinstance(body, dict) else None
        if kind is None:
            kinds = "; ".join(" with ".join(fields) + f" ({_SERVED[fields][0].__name__.removesuffix('Request')})"
                              for fields, _ in INVOCATION_KINDS)
            raise bad_request(f"/invocations could not tell what this request is; give {kinds}")
        model, handler = _SERVED[kind[0]]
        if kind[0] == ("input",) and ctx.engine.info.pooling.task == "classify":  # a classifier's input: /classify
            model, handler = ClassificationRequest, create_classification
        try:
            request = model.model_validate(body)
        except ValidationError as exc:
            raise APIError(400, *validation_message(exc.errors()[0])) from None
        return await handler(ctx, request, raw)
