"""``POST /classify`` (vLLM's endpoint; also ``/v1/classify``): a sequence classifier's class probabilities.

Each input (a string, or token ids) becomes one classification request: a pooling request of task ``classify``
(``inferneo.engine.protocol.PoolingRequest``), scheduled with the other requests and run through the model once
(prefill only); its logits come back and ``PoolingConfig.probabilities`` makes them the probabilities vLLM's
``/classify`` answers (softmax over the labels, the sigmoid of the logit for one label). The answer is vLLM's:
``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs", "num_classes"}], "usage"}``,
``label`` the config's ``id2label`` name of the likeliest class (null when it names none).
"""

from __future__ import annotations

import msgspec
from fastapi import Request
from fastapi.responses import Response

from inferneo.engine.protocol import InvalidRequestError, PoolingRequest
from inferneo.engine.request_group import RequestGroup
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import ClassificationRequest, now, random_id
from inferneo.entrypoints.openai.serving_common import ServerContext, cancel_on_disconnect
from inferneo.entrypoints.openai.serving_embedding import submit_inputs
from inferneo.pooling import PoolingConfig

_json_encode = msgspec.json.Encoder().encode


async def create_classification(ctx: ServerContext, req: ClassificationRequest, raw: Request) -> Response:
    """Classify every input of ``req``; 400 (OpenAI's error shape) for a model that does not classify or an
    input it cannot take (naming the input when there are several)."""
    model = ctx.model_name(req.model)
    if ctx.lora_for(model) is not None:
        raise bad_request(f"{model!r} is a LoRA adapter: classes are served by the base model only", "model")
    engine = ctx.engine
    pooling = PoolingRequest(task="classify")
    try:  # before tokenizing: a model that does not classify refuses at once
        engine.input.check_pooling(pooling)
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None
    request_id = random_id("classify")
    group = await submit_inputs(ctx, req, pooling, request_id)
    return await cancel_on_disconnect(raw, _respond(group, engine.info.pooling, request_id, model))


async def _respond(group: RequestGroup, classifier: PoolingConfig, request_id: str, model: str) -> Response:
    logits: dict[int, list[float]] = {}
    prompt_tokens = 0
    try:
        async for index, output in group:
            logits[index] = output.outputs.embedding
            prompt_tokens += len(output.prompt_token_ids)
    except Exception as exc:
        raise to_api_error(exc) from None
    finally:
        group.abort()
    data = []
    for index in range(len(logits)):
        probs = classifier.probabilities(logits[index])
        data.append(
            {"index": index, "label": classifier.label(probs), "probs": probs, "num_classes": len(probs)}
        )
    body = {
        "id": request_id,
        "object": "list",
        "created": now(),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    }
    return Response(_json_encode(body), media_type="application/json")
