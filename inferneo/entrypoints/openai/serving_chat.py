"""``POST /v1/chat/completions``: one conversation, or (an extension) a list of them, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from inferneo.engine.request_group import EngineRequest, RequestGroup
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, now, random_id, usage
from inferneo.entrypoints.openai.serving_common import (
    SSE_DONE,
    ServerContext,
    cancel_on_disconnect,
    check_common,
    collect_finals,
    event_stream,
    render_chat,
    sampling_params,
    sse,
    usage_of,
)
from inferneo.entrypoints.openai.serving_completion import finite
from inferneo.outputs import Logprob


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported", "tool_choice")
    if req.functions or req.function_call not in (None, "none"):
        raise bad_request("functions are not supported", "functions")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    model = ctx.model_name(req.model)
    check_common(req)
    _check_unsupported(req)
    engine = ctx.engine
    prompt_ids = [render_chat(ctx.tokenizer, c, req.add_generation_prompt, req.chat_template_kwargs)
                  for c in req.conversations()]
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # Without max_tokens, a chat answer may use the rest of the context (as far as the KV cache allows).
    room = min(engine.max_model_len, engine.kv_capacity_tokens)
    request_id = random_id("chatcmpl")
    requests = []
    for i, ids in enumerate(prompt_ids):
        limit = max_tokens if max_tokens is not None else max(room - len(ids), 1)
        requests.append(EngineRequest(f"{request_id}-{i}", ids, sampling_params(req, ctx.defaults, limit, logprobs),
                                      req.priority))
    try:
        group = engine.submit(requests, param="messages")
    except Exception as exc:
        raise to_api_error(exc) from None
    job = _Chat(request_id, model, req, group, len(requests))
    if req.stream:
        return event_stream(job.events(), group.abort)
    return await cancel_on_disconnect(raw, job.response())


class _Chat:
    """One chat call in flight."""

    def __init__(self, request_id: str, model: str, req: ChatCompletionRequest, group: RequestGroup,
                 num_conversations: int) -> None:
        self.request_id = request_id
        self.model = model
        self.req = req
        self.group = group
        self.num_conversations = num_conversations
        self.created = now()
        self.top_k = (req.top_logprobs or 0) if req.logprobs else None

    async def response(self) -> Response:
        finals = await collect_finals(self.group)
        choices = []
        for i in sorted(finals):
            for choice in finals[i].outputs:
                logprobs = None
                if self.top_k is not None:
                    logprobs = {"content": chat_logprobs(choice.token_ids, choice.logprobs or [], self.top_k)}
                choices.append({
                    "index": i * self.req.n + choice.index,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                })
        return JSONResponse({
            "id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": choices, "usage": usage_of(finals.values()), "system_fingerprint": None,
        })

    async def events(self) -> AsyncIterator[bytes]:
        req, n = self.req, self.req.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base: dict[str, Any] = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": None}

        def chunk(key: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> bytes:
            payload = {**base, "choices": [{"index": key, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason}]}
            if include_usage:
                payload["usage"] = None
            return sse(payload)

        for key in range(self.num_conversations * n):
            yield chunk(key, {"role": "assistant", "content": ""})
        num_prompt_tokens = num_cached_tokens = num_completion_tokens = 0
        async for i, delta in self.group:
            for choice in delta.outputs:
                key = i * n + choice.index
                text = choice.text
                num_completion_tokens += len(choice.token_ids)
                logprobs = None
                if self.top_k is not None and choice.token_ids:
                    logprobs = {"content": chat_logprobs(choice.token_ids, choice.logprobs or [], self.top_k)}
                if not text and logprobs is None and choice.finish_reason is None:
                    continue
                yield chunk(key, {"content": text} if text else {}, logprobs, choice.finish_reason)
            if delta.finished:
                num_prompt_tokens += len(delta.prompt_token_ids)
                num_cached_tokens += delta.num_cached_tokens
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(num_prompt_tokens, num_completion_tokens,
                                                             num_cached_tokens)})
        yield SSE_DONE


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top_k: int) -> list[dict[str, Any]]:
    """The chat shape: per token its text, log-probability, UTF-8 bytes and the ``top_k`` most likely."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        text = (sampled.decoded_token if sampled else None) or ""
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_k),
                        key=lambda lp: lp.rank)[:top_k]
        content.append({
            "token": text,
            "logprob": finite(sampled.logprob) if sampled else -9999.0,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": finite(lp.logprob),
                              "bytes": list((lp.decoded_token or "").encode("utf-8"))} for lp in ranked],
        })
    return content

