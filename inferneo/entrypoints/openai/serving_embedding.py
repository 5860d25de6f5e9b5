"""``POST /v1/embeddings``: OpenAI's embeddings endpoint over the same engine that generates.

Each input (a string, or token ids) becomes one embedding request: scheduled with the generation requests, run
through the model once (prefill only), pooled as the model's pooling says (``inferneo.pooling``). Vectors are
sent as JSON floats, or with ``encoding_format: "base64"`` as the base64 of their little-endian float32 bytes
(what OpenAI sends, and what the ``openai`` package asks for by default and decodes). vLLM's
``truncate_prompt_tokens`` cuts each input instead of refusing a longer one (``InputProcessor.truncation_length``).
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import numpy as np
from fastapi import Request
from fastapi.responses import Response

from inferneo.engine.input_processor import truncate_token_ids, truncation_kwargs
from inferneo.engine.protocol import InvalidRequestError, PoolingRequest
from inferneo.engine.request_group import EngineRequest, RequestGroup
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import ClassificationRequest, EmbeddingRequest, random_id
from inferneo.entrypoints.openai.serving_common import ServerContext, cancel_on_disconnect
from inferneo.outputs import EmbeddingRequestOutput


async def create_embedding(ctx: ServerContext, req: EmbeddingRequest, raw: Request) -> Response:
    model = ctx.model_name(req.model)
    if ctx.lora_for(model) is not None:
        raise bad_request(f"{model!r} is a LoRA adapter: embeddings are served by the base model only", "model")
    group = await submit_inputs(ctx, req, PoolingRequest(req.dimensions), random_id("embd"))
    return await cancel_on_disconnect(raw, _respond(group, model, req.encoding_format))


async def submit_inputs(ctx: ServerContext, req: EmbeddingRequest | ClassificationRequest, pooling: PoolingRequest,
                        request_id: str) -> RequestGroup:
    """Cut (``truncate_prompt_tokens``), tokenize (off the event loop when long), check and submit every input of
    a pooling request as ``pooling`` asks; a 400 naming the field (and the input, when there are several) for an
    input the model cannot take."""
    engine = ctx.engine
    inputs = req.input_list()
    try:
        max_length = engine.input.truncation_length(
            req.truncate_prompt_tokens, text=any(isinstance(x, str) for x in inputs)
        )
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None
    text_chars = sum(len(x) for x in inputs if isinstance(x, str))
    prompt_ids = await ctx.tokenize_off_loop(text_chars, lambda: tokenize_inputs(ctx.tokenizer, inputs, max_length))
    for i, ids in enumerate(prompt_ids):
        try:
            engine.input.check_embedding(ids, pooling, "input", req.priority)
        except InvalidRequestError as exc:
            where = f"input {i}: " if len(prompt_ids) > 1 and exc.param == "input" else ""
            raise bad_request(where + str(exc), exc.param) from None
    try:
        return engine.submit([EngineRequest(f"{request_id}-{i}", ids, None, req.priority, pooling=pooling)
                              for i, ids in enumerate(prompt_ids)], param="input")
    except Exception as exc:
        raise to_api_error(exc) from None


def tokenize_inputs(tokenizer, inputs: list[str | list[int]], max_length: int | None = None) -> list[list[int]]:
    """Token ids of every input (the strings tokenized in one batch call, with the model's special tokens), each
    cut to ``max_length`` tokens when that is set (``truncate_prompt_tokens``: a text as the tokenizer truncates,
    token ids to their last ones)."""
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    ids: list[Any] = [x if isinstance(x, str) else truncate_token_ids(x, max_length) for x in inputs]
    if texts:
        encoded = tokenizer([x for _, x in texts], verbose=False, **truncation_kwargs(max_length)).input_ids
        for (i, _), tokens in zip(texts, encoded, strict=True):
            ids[i] = tokens
    return ids


async def _respond(group: RequestGroup, model: str, encoding_format: str) -> Response:
    outputs: dict[int, EmbeddingRequestOutput] = {}
    try:
        async for index, output in group:
            outputs[index] = output
    except Exception as exc:
        raise to_api_error(exc) from None
    finally:
        group.abort()
    data = [{"object": "embedding", "index": index, "embedding": _encode(outputs[index].outputs.embedding,
                                                                        encoding_format)}
            for index in range(len(outputs))]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs.values())
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return Response(_json_encode(body), media_type="application/json")


_json_encode = msgspec.json.Encoder().encode


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
