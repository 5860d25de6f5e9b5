"""``POST /v1/score`` and ``POST /v1/rerank`` (also ``/v2/rerank``): a cross-encoder's scores, in vLLM's shapes.

Each (query, document) pair is tokenized as the tokenizer joins two texts and becomes one scoring request: a
pooling request of task ``score`` (``inferneo.engine.protocol.PoolingRequest``), scheduled with the other
requests and run as one encoder input; its logit comes back and the model's ``PoolingConfig.score`` makes it
the score sentence-transformers' ``CrossEncoder.predict`` gives. ``/v1/score`` answers every pair in order;
``/v1/rerank`` (Jina's and Cohere's request, vLLM's answer) sorts the documents by score, best first. Both take
vLLM's ``truncate_prompt_tokens``: each pair is cut to that many tokens, the longer text first.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response

from inferneo.engine.input_processor import pair_type_start, truncation_kwargs
from inferneo.engine.protocol import InvalidRequestError, PoolingRequest
from inferneo.engine.request_group import EngineRequest
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import RerankRequest, ScoreRequest, now, random_id
from inferneo.entrypoints.openai.serving_common import ServerContext, cancel_on_disconnect
from inferneo.entrypoints.score_pairs import score_pairs

_json_encode = msgspec.json.Encoder().encode


async def create_score(ctx: ServerContext, req: ScoreRequest, raw: Request) -> Response:
    """``/v1/score``: ``{"object": "list", "data": [{"index", "object": "score", "score"}], "usage"}``."""
    model = ctx.model_name(req.model)
    try:
        pairs = score_pairs(req.text_1, req.text_2)
    except ValueError as exc:
        raise bad_request(str(exc), "text_1") from None
    request_id = random_id("score")

    async def respond() -> Response:
        scores, tokens = await _scores(ctx, model, pairs, req, "text_2", request_id)
        body = {
            "id": request_id,
            "object": "list",
            "created": now(),
            "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
        return Response(_json_encode(body), media_type="application/json")

    return await cancel_on_disconnect(raw, respond())


async def create_rerank(ctx: ServerContext, req: RerankRequest, raw: Request) -> Response:
    """``/v1/rerank``: ``{"id", "model", "usage": {"total_tokens"}, "results": [{"index", "document": {"text"},
    "relevance_score"}]}``, best first, ``top_n`` of them."""
    model = ctx.model_name(req.model)
    request_id = random_id("rerank")

    async def respond() -> Response:
        pairs = [(req.query, document) for document in req.documents]
        scores, tokens = await _scores(ctx, model, pairs, req, "documents", request_id)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
        results: list[dict[str, Any]] = []
        for index in ranked:
            result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if req.return_documents:
                result["document"] = {"text": req.documents[index]}
            results.append(result)
        body = {"id": request_id, "model": model, "usage": {"total_tokens": tokens}, "results": results}
        return Response(_json_encode(body), media_type="application/json")

    return await cancel_on_disconnect(raw, respond())


async def _scores(
    ctx: ServerContext,
    model: str,
    pairs: list[tuple[str, str]],
    req: ScoreRequest | RerankRequest,
    param: str,
    request_id: str,
) -> tuple[list[float], int]:
    """The score of every pair, in order, and the tokens they took; ``param`` names the field an over-long pair
    is blamed on (unless the request's ``truncate_prompt_tokens`` cuts it)."""
    if ctx.lora_for(model) is not None:
        raise bad_request(f"{model!r} is a LoRA adapter: scores are served by the base model only", "model")
    engine = ctx.engine
    priority = req.priority
    pooling = PoolingRequest(task="score")
    try:
        engine.input.check_pooling(pooling)  # before tokenizing: a model that does not score refuses at once
        max_length = engine.input.truncation_length(req.truncate_prompt_tokens, pair=True)
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None
    try:
        prompt_ids, type_starts = await ctx.tokenize_off_loop(
            sum(len(a) + len(b) for a, b in pairs), lambda: _tokenize_pairs(ctx.tokenizer, pairs, max_length)
        )
    except ValueError as exc:  # a tokenizer whose pair types are not two segments
        raise bad_request(str(exc), "model") from None
    for i, ids in enumerate(prompt_ids):
        try:
            engine.input.check_embedding(ids, pooling, param, priority)
        except InvalidRequestError as exc:
            where = f"pair {i}: " if len(prompt_ids) > 1 and exc.param == param else ""
            raise bad_request(where + str(exc).replace("the input has", "the pair has"), exc.param) from None
    try:
        group = engine.submit(
            [
                EngineRequest(
                    f"{request_id}-{i}",
                    ids,
                    None,
                    priority,
                    pooling=PoolingRequest(task="score", token_type_start=start),
                )
                for i, (ids, start) in enumerate(zip(prompt_ids, type_starts, strict=True))
            ],
            param=param,
        )
    except Exception as exc:
        raise to_api_error(exc) from None
    logits: dict[int, list[float]] = {}
    try:
        async for index, output in group:
            logits[index] = output.outputs.embedding
    except Exception as exc:
        raise to_api_error(exc) from None
    finally:
        group.abort()
    score = engine.info.pooling.score
    return [score(logits[i]) for i in range(len(pairs))], sum(map(len, prompt_ids))


def _tokenize_pairs(
    tokenizer, pairs: list[tuple[str, str]], max_length: int | None
) -> tuple[list[list[int]], list[int | None]]:
    """Token ids of every pair, joined as the tokenizer joins two texts, in one batch call, and each pair's first
    position of token type 1 (``InputProcessor.tokenize_pair``); each pair cut to ``max_length`` tokens, longest
    text first, when that is set."""
    encoded = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], verbose=False, **truncation_kwargs(max_length)
    )
    types = encoded.get("token_type_ids") or [None] * len(pairs)
    return encoded.input_ids, [pair_type_start(t) for t in types]
