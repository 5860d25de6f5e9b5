"""``POST /v1/completions``: one or many prompts, each fanned out to ``n`` choices, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from inferneo.engine.beam_search_group import BeamSearchGroup
from inferneo.engine.prompt_embeds import (
    PromptEmbeds,
    PromptEmbedsError,
    decode_prompt_embeds,
    max_encoded_length,
)
from inferneo.engine.protocol import InvalidRequestError
from inferneo.engine.request_group import EngineRequest, RequestGroup
from inferneo.entrypoints.openai.beam_requests import beam_search_of, submit_beam_search
from inferneo.entrypoints.openai.completion_scoring import (
    completion_logprobs,
    echo_logprobs,
    prompt_logprobs_json,
    scoring_depth,
)
from inferneo.entrypoints.openai.constraints import structured_outputs_of
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import CompletionRequest, now, random_id
from inferneo.entrypoints.openai.serving_common import (
    SSE_DONE,
    ServerContext,
    StreamUsage,
    cancel_on_disconnect,
    check_common,
    check_logprobs,
    collect_finals,
    event_stream,
    sampling_params,
    sse,
    text_tokens,
    truncate_prompts,
    usage_of,
)
from inferneo.outputs import RequestOutput
from inferneo.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 16  # the OpenAI default for completions


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    model = ctx.model_name(req.model)
    lora = ctx.lora_for(model)  # now: an unload while the prompt is tokenized off the loop must not drop it
    check_common(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of must equal n ({req.n}) or be left out: ranking candidates is not supported",
                          "best_of")
    beam = beam_search_of(req)
    depth = scoring_depth(req)
    engine = ctx.engine
    check_logprobs(engine, {"logprobs": req.logprobs, "prompt_logprobs": req.prompt_logprobs})
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    params = sampling_params(req, ctx.defaults, max_tokens, req.logprobs, structured_outputs_of(req), depth)
    embeds = await _prompt_embeds(ctx, req, params) if req.prompt_embeds_list() else []
    prompts = req.prompt_list()
    prompt_ids = await ctx.tokenize_off_loop(
        sum(len(p) for p in prompts if isinstance(p, str)),
        lambda: [engine.tokenize(p) if isinstance(p, str) else p for p in prompts])
    truncated = truncate_prompts(prompt_ids, req.truncate_prompt_tokens, engine.max_model_len, max_tokens)
    cut = [len(t) < len(ids) for t, ids in zip(truncated, prompt_ids, strict=True)]
    prompt_ids = truncated
    request_id = random_id("cmpl")
    try:
        if beam is not None:
            group = submit_beam_search(engine, request_id, prompt_ids, beam, [max_tokens] * len(prompt_ids),
                                       req.priority, lora, ctx.tokenizer, req.skip_special_tokens,
                                       cache_salt=req.cache_salt)
        else:  # the prompts given as embeddings first, then the others (vLLM's order of the choices)
            requests = [EngineRequest(f"{request_id}-{i}", ids, params, req.priority, lora=lora,
                                      cache_salt=req.cache_salt, prompt_embeds=rows)
                        for i, (ids, rows) in enumerate(embeds)]
            requests += [EngineRequest(f"{request_id}-{len(embeds) + i}", ids, params, req.priority, lora=lora,
                                       cache_salt=req.cache_salt)
                         for i, ids in enumerate(prompt_ids)]
            group = engine.submit(requests)
    except Exception as exc:
        raise to_api_error(exc) from None
    echo_texts: list[str] | None = None
    if req.echo:
        echo_texts = [p if isinstance(p, str) and not was_cut else ctx.tokenizer.decode(ids)
                      for p, ids, was_cut in zip(prompts, prompt_ids, cut, strict=True)]
    num_prompt_tokens = sum(len(ids) for ids, _ in embeds) + sum(map(len, prompt_ids))
    job = _Completion(request_id, model, req, group, echo_texts, ctx, num_prompt_tokens)
    if req.stream:
        return event_stream(job.events(), group.abort)
    return await cancel_on_disconnect(raw, job.response())


async def _prompt_embeds(ctx: ServerContext, req: CompletionRequest,
                         params: SamplingParams) -> list[tuple[list[int], PromptEmbeds]]:
    """The request's prompts given as embeddings (vLLM's ``prompt_embeds``: base64 ``torch.save``s of
    ``[num_tokens, hidden_size]`` tensors), read (``decode_prompt_embeds``: tensors only, never other pickled objects)
    and checked as the engine takes them: each one's placeholder ids and rows. 400 (``prompt_embeds``) when the
    server was not started with ``--enable-prompt-embeds``, for what cannot be read or does not fit the model, and
    with ``echo`` or beam search (the prompt has no text, nor tokens to extend)."""
    engine = ctx.engine
    limits = engine.input.limits
    if limits.prompt_embeds_refusal is not None:
        raise bad_request(limits.prompt_embeds_refusal, "prompt_embeds")
    if req.echo:
        raise bad_request("echo is not supported with prompt_embeds: a prompt given as embeddings has no text",
                          "echo")
    if req.use_beam_search:
        raise bad_request("beam search is not supported with prompt_embeds", "use_beam_search")
    texts = req.prompt_embeds_list()
    max_length = max_encoded_length(limits.max_model_len, limits.hidden_size)

    def read() -> list[tuple[list[int], PromptEmbeds]]:
        read_in: list[tuple[list[int], PromptEmbeds]] = []
        for index, text in enumerate(texts):
            where = f"prompt_embeds {index}: " if len(texts) > 1 else ""
            try:
                tensor = decode_prompt_embeds(text, limits.hidden_size, max_length)
                ids, rows = engine.input.prepare_prompt_embeds(tensor, params, req.truncate_prompt_tokens)
                engine.input.check(ids, params, "prompt_embeds", req.priority)
            except PromptEmbedsError as exc:
                raise bad_request(where + str(exc), "prompt_embeds") from None
            except InvalidRequestError as exc:
                raise bad_request(where + str(exc), exc.param) from None
            read_in.append((ids, rows))
        return read_in

    return await ctx.tokenize_off_loop(sum(len(t) for t in texts), read)


class _Completion:
    """One completion call in flight."""

    def __init__(self, request_id: str, model: str, req: CompletionRequest, group: RequestGroup | BeamSearchGroup,
                 echo_texts: list[str] | None, ctx: ServerContext, num_prompt_tokens: int) -> None:
        self.tokenizer = ctx.tokenizer
        self.force_usage = ctx.options.force_include_usage
        as_ids = req.return_tokens_as_token_ids
        self.as_ids = ctx.options.return_tokens_as_token_ids if as_ids is None else as_ids
        self.fingerprint = ctx.fingerprint(model)
        self.num_prompt_tokens = num_prompt_tokens
        self.request_id = request_id
        self.model = model
        self.req = req
        self.group = group
        self.echo_texts = echo_texts
        self.created = now()

    async def response(self) -> Response:
        finals = await collect_finals(self.group)
        n = self.req.n
        choices = []
        for i in sorted(finals):
            prefix = self.echo_texts[i] if self.echo_texts else ""
            for choice in finals[i].outputs:
                logprobs = None
                if self.req.logprobs is not None:
                    token_ids, token_logprobs = text_tokens(choice, self.req.include_stop_str_in_output)
                    logprobs, _ = self._logprobs(finals[i], token_ids, token_logprobs, echo=bool(prefix))
                body = {"index": i * n + choice.index, "text": prefix + choice.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
                if self.req.return_token_ids:
                    body["prompt_token_ids"] = finals[i].prompt_token_ids
                    body["token_ids"] = choice.token_ids
                if self.req.prompt_logprobs is not None:
                    body["prompt_logprobs"] = prompt_logprobs_json(finals[i].prompt_logprobs)
                choices.append(body)
        return JSONResponse({
            "id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": choices, "usage": usage_of(finals.values()), "system_fingerprint": self.fingerprint,
        })

    async def events(self) -> AsyncIterator[bytes]:
        req, n = self.req, self.req.n
        counts = StreamUsage(req.stream_options, self.num_prompt_tokens, self.force_usage)
        base: dict[str, Any] = {"id": self.request_id, "object": "text_completion", "created": self.created,
                                "model": self.model, "system_fingerprint": self.fingerprint}
        started: set[int] = set()
        ids_started: set[int] = set()  # the choices whose prompt_token_ids were sent (return_token_ids)
        offsets: dict[int, int] = {}  # text_offset of each choice's next token
        async for i, delta in self.group:
            counts.add(i, delta)
            for choice in delta.outputs:
                key = i * n + choice.index
                text = choice.text
                echo = False
                if key not in started:
                    started.add(key)
                    if self.echo_texts:
                        text = self.echo_texts[i] + text
                        echo = True
                logprobs = None
                token_ids, token_logprobs = text_tokens(choice, req.include_stop_str_in_output)
                if req.logprobs is not None and (token_ids or echo):
                    logprobs, offsets[key] = self._logprobs(delta, token_ids, token_logprobs, echo,
                                                            offsets.get(key, 0))
                ids = req.return_token_ids
                if not text and logprobs is None and choice.finish_reason is None and not (ids and (
                        choice.token_ids or echo)):
                    continue
                body = {"index": key, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason,
                        "stop_reason": choice.stop_reason if choice.finish_reason else None}
                if ids:  # vLLM's: the prompt's ids in a choice's first chunk, each chunk's new ids
                    if key not in ids_started:
                        ids_started.add(key)
                        body["prompt_token_ids"] = delta.prompt_token_ids
                    body["token_ids"] = choice.token_ids
                chunk = {**base, "choices": [body]}
                yield sse(counts.put(chunk))
        if counts.include:
            yield sse({**base, "choices": [], "usage": counts.totals()})
        yield SSE_DONE

    def _logprobs(self, output: RequestOutput, token_ids: list[int], logprobs: list, echo: bool,
                  offset: int = 0) -> tuple[dict[str, Any], int]:
        """The legacy ``logprobs`` object of a choice (or of a stream chunk): the echoed prompt's tokens first
        when ``echo``; and the text offset after its last token."""
        if not echo:
            return completion_logprobs(token_ids, logprobs, offset, self.as_ids)
        prompt_ids = output.prompt_token_ids
        first = self.tokenizer.decode(prompt_ids[:1])
        return echo_logprobs(prompt_ids, output.prompt_logprobs or [None], first, self.req.logprobs, token_ids,
                             logprobs, self.as_ids)

