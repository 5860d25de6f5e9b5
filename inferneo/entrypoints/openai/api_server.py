"""The FastAPI app (``build_app``) and ``serve``, which loads a model and runs it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import inferneo
from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.engine.async_engine import AsyncEngine
from inferneo.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from inferneo.entrypoints.anthropic.serving import count_message_tokens, create_message
from inferneo.entrypoints.chat_template_kwargs import template_kwargs_error
from inferneo.entrypoints.openai.batch_api import batch_service, install_batch_routes
from inferneo.entrypoints.openai.draining import DrainingServer, DrainMiddleware, DrainState
from inferneo.entrypoints.openai.errors import APIError, bad_request, error_body, install_error_handlers
from inferneo.entrypoints.openai.guards import ServerGuards, install_guards, route_path
from inferneo.entrypoints.openai.http_middleware import LoadMiddleware, RequestIdMiddleware, ServerLoad
from inferneo.entrypoints.openai.http_options import HttpOptions
from inferneo.entrypoints.openai.invocations import install_sagemaker_routes
from inferneo.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from inferneo.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)
from inferneo.entrypoints.openai.protocol_responses import InputTokensRequest, ResponsesRequest
from inferneo.entrypoints.openai.replicas import health_body, replica_client
from inferneo.entrypoints.openai.response_options import ResponseOptions
from inferneo.entrypoints.openai.serving_chat import create_chat_completion, prepare_images
from inferneo.entrypoints.openai.serving_classification import create_classification
from inferneo.entrypoints.openai.serving_common import ServerContext, render_chat
from inferneo.entrypoints.openai.serving_completion import create_completion
from inferneo.entrypoints.openai.serving_dev import install_dev_routes
from inferneo.entrypoints.openai.serving_embedding import create_embedding
from inferneo.entrypoints.openai.serving_lora import install_lora_routes, lora_model_cards
from inferneo.entrypoints.openai.serving_responses import count_input_tokens, create_response
from inferneo.entrypoints.openai.serving_score import create_rerank, create_score
from inferneo.entrypoints.openai.stats_logger import log_stats_forever
from inferneo.lora.registry import LoraModule, LoRARegistry
from inferneo.startup_heap import freeze_startup_heap

logger = logging.getLogger(__name__)

# How long an idle keep-alive connection stays open. Longer than the 5 s after which httpx (so the openai package
# and InferneoClient) stops reusing an idle connection: with both at 5 s (uvicorn's default), a client could
# send a request on a connection at the moment the server closed it, and get a connection error (seen under a
# flood of 429s, whose Retry-After waits leave connections idle).
KEEP_ALIVE_S = 15


def build_app(ctx: ServerContext, metrics: ServerMetrics | None = None, guards: ServerGuards | None = None,
              log_stats_interval: float | None = None, http: HttpOptions | None = None,
              vllm_metric_names: bool = False, files_dir: str | None = None,
              dev_endpoints: bool = False) -> FastAPI:
    """The HTTP app over a started-or-not engine; its lifespan starts the engine and shuts it down.

    ``guards`` (limits, API keys from ``ctx.api_keys``, CORS) default to ``ServerGuards()``. With
    ``log_stats_interval`` (seconds), the engine's statistics are logged that often while it has work
    (``stats_logger``). ``http`` (default ``HttpOptions()``) says whether the API docs pages are served, responses
    carry ``X-Request-Id`` and ``/load`` counts the requests in flight; its other options are uvicorn's.
    ``files_dir`` holds the files of OpenAI's Files and Batch APIs (``batch_api``; None: a temporary folder).
    ``dev_endpoints`` adds ``/sleep``, ``/wake_up``, ``/is_sleeping`` and ``/reset_prefix_cache`` (``serving_dev``)."""
    http = http or HttpOptions()
    metrics = metrics or ServerMetrics(ctx.engine, ctx.served_model_names[0], vllm_names=vllm_metric_names)
    if ctx.engine.observer is None:
        ctx.engine.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        await batches.resume()
        stats = None if log_stats_interval is None else asyncio.create_task(
            log_stats_forever(ctx.engine, log_stats_interval))
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            await batches.close()
            remove_files()
            ctx.engine.shutdown()

    docs = not http.disable_fastapi_docs
    app = FastAPI(title="Inferneo", version=inferneo.__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.ctx = ctx
    app.state.metrics = metrics
    load = app.state.load = ServerLoad(http.enable_server_load_tracking)
    install_error_handlers(app)
    batches, remove_files = batch_service(app, ctx.api_keys[0] if ctx.api_keys else None, files_dir)
    install_batch_routes(app, batches)
    ctx.image_files = batches.files.image_data_url  # images uploaded with purpose vision, for input_image file_id
    app.add_middleware(LoadMiddleware, load=load, route_path=route_path)  # innermost: admitted requests only
    install_guards(app, ctx, guards)  # API keys, limits, CORS, request logging: see guards.py
    if http.enable_request_id_headers:
        app.add_middleware(RequestIdMiddleware)  # outside the guards: their refusals carry the id too

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if ctx.engine.is_healthy:
            replicas = replica_client(ctx.engine)  # data-parallel: the capacity left
            return Response(status_code=200) if replicas is None else JSONResponse(health_body(replicas))
        message = "the engine is not serving requests"
        if ctx.engine.dead_error is not None:
            message += f": {ctx.engine.dead_error!r}"
        return JSONResponse(error_body(503, message, code="engine_unavailable"), status_code=503)

    install_sagemaker_routes(app, ctx, health)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": inferneo.__version__}

    @app.get("/load")
    async def server_load() -> dict[str, int]:
        """vLLM's ``/load``: the requests in flight on the model's routes (0 without load tracking)."""
        return {"server_load": load.in_flight}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(ctx, name) for name in ctx.served_model_names]
                + lora_model_cards(ctx, _model_card)}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        name = ctx.model_name(name)
        return next((c for c in lora_model_cards(ctx, _model_card) if c["id"] == name), None) or _model_card(ctx, name)

    install_lora_routes(app, ctx)
    if dev_endpoints:
        install_dev_routes(app, ctx)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request) -> Response:
        return await create_response(ctx, body, raw)

    @app.post("/v1/responses/input_tokens")
    async def responses_input_tokens(body: InputTokensRequest) -> dict[str, Any]:
        return await count_input_tokens(ctx, body)

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    @app.post("/v1/responses/{response_id}/cancel")
    @app.get("/v1/responses/{response_id}/input_items")
    async def stored_response(response_id: str) -> Response:
        raise APIError(404, f"no response {response_id[:80]!r}: this server stores no responses (each answer is "
                            "returned whole or streamed, and then forgotten)", code="response_not_found")

    @app.post("/v1/messages")  # Anthropic's Messages API (inferneo.entrypoints.anthropic), its errors in its shape
    async def messages(body: MessagesRequest, raw: Request) -> Response:
        return await create_message(ctx, body, raw)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(body: CountTokensRequest) -> dict[str, int]:
        return await count_message_tokens(ctx, body)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        return await create_embedding(ctx, body, raw)

    @app.post("/classify")  # vLLM's path
    @app.post("/v1/classify")
    async def classify(body: ClassificationRequest, raw: Request) -> Response:
        return await create_classification(ctx, body, raw)

    @app.post("/v1/score")
    @app.post("/score")  # vLLM serves both
    async def score(body: ScoreRequest, raw: Request) -> Response:
        return await create_score(ctx, body, raw)

    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    @app.post("/rerank")
    async def rerank(body: RerankRequest, raw: Request) -> Response:
        return await create_rerank(ctx, body, raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            ctx.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        tokenizer = ctx.tokenizer
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            try:
                messages, images = ctx.engine.input.conversation_images(body.messages)
            except ValueError as exc:
                raise bad_request(str(exc), "messages") from None
            ids = render_chat(tokenizer, messages, body.generation_prompt(),
                              ctx.template_kwargs(body.chat_template_kwargs),
                              bool(body.add_special_tokens), tools=tools,
                              continue_final_message=body.continue_final_message)
            (ids,), _ = await prepare_images(ctx, [ids], [images], None)  # as many image tokens as generation has
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tokenizer(body.prompt, add_special_tokens=add_special).input_ids
        result: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.engine.max_model_len, "tokens": ids,
                                  "token_strs": None}
        if body.return_token_strs:
            result["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return result

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            ctx.model_name(body.model)
        vocab = ctx.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}); got {bad[:5]}", "tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    return app


def _model_card(ctx: ServerContext, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "inferneo", "root": ctx.model_path,
            "parent": None, "max_model_len": ctx.engine.max_model_len}


def serve(config: EngineConfig, served_model_names: list[str] | None, host: str, port: int, api_keys: list[str],
          max_queued_requests: int | None = None, log_level: str = "info", access_log: bool = True,
          shutdown_timeout: float = 30.0, engine_in_process: bool = False,
          guards: ServerGuards | None = None, tool_call_parser: str | None = None,
          lora_modules: list[LoraModule] | None = None, reasoning_parser: str | None = None,
          http: HttpOptions | None = None, log_stats: bool = True,
          response_options: ResponseOptions | None = None,
          default_chat_template_kwargs: dict[str, Any] | None = None, vllm_metric_names: bool = False,
          files_dir: str | None = None, dev_endpoints: bool = False) -> int:
    """Load ``config.model``, serve it until SIGTERM or SIGINT, then finish or abort what is in flight; returns the
    exit status: 0 after a requested shut-down.

    ``max_queued_requests`` is the server's admission limit (None: no limit): while that many sequences wait for
    a batch slot, new requests get 429. It is a server setting, not an engine option, so it is no
    ``EngineConfig`` field; the async engine front is the one place that reads it.

    If the engine dies (its process is killed, a tensor-parallel worker dies, too many steps fail), ``/health``
    and new requests answer 503 for ``INFERNEO_ENGINE_DEATH_EXIT_S`` seconds (default 2), then the server stops
    by itself and this returns 1.

    The engine core runs in a child process (so the model's Python and the HTTP server do not share a GIL);
    ``engine_in_process`` runs it in a thread of this process instead.

    ``tool_call_parser`` names the format of tool calls in answers to ``tool_choice: "auto"`` (see
    ``ServerContext``); None lets the chat template decide. ``lora_modules`` (with ``config.enable_lora``) are
    the LoRA adapters served from the start, by name. ``reasoning_parser`` (``reasoning.REASONING_PARSERS``)
    splits a reasoning model's thinking from its answers. ``http`` holds the HTTP layer's options (TLS, the
    root path, uvicorn's log level); ``log_stats`` logs the engine's statistics periodically (``stats_logger``).
    ``response_options``: the server-wide options of answers (``--response-role`` and the like).
    ``default_chat_template_kwargs`` are the chat template's variables for requests that do not set them (a
    request's ``chat_template_kwargs`` win key by key), e.g. ``{"enable_thinking": False}``. ``vllm_metric_names``:
    ``/metrics`` also gives every metric under vLLM's name (``vllm:...``). ``files_dir``: where OpenAI's Files and
    Batch APIs keep their files (None: a temporary folder, removed at shut-down). ``dev_endpoints``: serve the
    sleep-mode and prefix-cache endpoints reinforcement-learning trainers call (``serving_dev``).
    """
    import uvicorn

    http = http or HttpOptions()
    stats_interval = envs.log_stats_interval_s() if log_stats else None  # a bad value fails before loading

    if max_queued_requests is not None and (not isinstance(max_queued_requests, int) or max_queued_requests < 1):
        raise ValueError(f"max_queued_requests must be a positive integer or None; got {max_queued_requests!r}")
    engine_death_exit_s = envs.engine_death_exit_s()  # bad values fail here, before the model loads
    if lora_modules and not config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if default_chat_template_kwargs is not None:
        if not isinstance(default_chat_template_kwargs, dict):
            raise ValueError("default_chat_template_kwargs must be a JSON object, got "
                             f"{type(default_chat_template_kwargs).__name__}")
        if (error := template_kwargs_error(default_chat_template_kwargs)) is not None:
            raise ValueError(f"default_chat_template_kwargs: {error}")
    loras = lora_registry(config, served_model_names or [], lora_modules or [])  # bad adapters fail before loading
    envs.engine_omp_spin_count()
    engine, facts = _load_engine(config, max_queued_requests, engine_in_process)
    names = served_model_names or [config.model or facts["name"]]
    if loras is not None:
        loras.reserved.update(names)
    try:
        ctx = ServerContext(engine, names, facts["path"], api_keys, tool_call_parser, loras=loras,
                            reasoning_parser=reasoning_parser, options=response_options or ResponseOptions(),
                            default_chat_template_kwargs=default_chat_template_kwargs)
    except ValueError:
        engine.shutdown()
        raise
    app = build_app(ctx, guards=guards, log_stats_interval=stats_interval, http=http,
                    vllm_metric_names=vllm_metric_names, files_dir=files_dir, dev_endpoints=dev_endpoints)
    drain = DrainState()
    app.add_middleware(DrainMiddleware, state=drain)  # outermost: counts every request, refuses while draining
    shown_host = f"[{host}]" if ":" in host else host
    logger.info("loaded %s (%s) as %s: dtype %s on %s, max_model_len %d, engine %s", facts["name"],
                ", ".join(facts["architectures"] or []), ", ".join(names), facts["dtype"], facts["device"],
                engine.max_model_len, "in this process" if engine_in_process else
                f"in {config.data_parallel_size} {config.data_parallel_backend} replicas, routed by "
                f"{config.data_parallel_routing}" if config.data_parallel_size > 1 else "in a child process")
    kv_bytes = facts["num_blocks"] * facts["kv_bytes_per_block"]
    logger.info("KV cache%s: %s in %d blocks of %d tokens (%d tokens)",
                " per replica" if config.data_parallel_size > 1 else "",
                f"{kv_bytes / 2**30:.2f} GiB" if kv_bytes >= 2**30 else f"{kv_bytes / 2**20:.1f} MiB",
                facts["num_blocks"], facts["block_size"], engine.kv_capacity_tokens)
    logger.info("tool calls of tool_choice 'auto' answers: %s", ctx.tool_parser.__name__ if ctx.tool_parser
                else "not parsed (left in content)")
    if ctx.reasoning is not None:
        logger.info("reasoning: %s (%s) returned apart as 'reasoning'", ctx.reasoning.name,
                    ctx.reasoning.describe())
    scheme = "https" if http.ssl_certfile else "http"
    where = f"{scheme}+unix:{http.uds} ({scheme}://localhost" if http.uds else f"{scheme}://{shown_host}:{port}"
    logger.info("serving the OpenAI API at %s%s/v1%s%s", where, http.root_path, ")" if http.uds else "",
                " (API key required)" if api_keys else "")
    server = DrainingServer(uvicorn.Config(app, host=host, port=port,
                                           log_level=(http.uvicorn_log_level or log_level).lower(),
                                           access_log=access_log, timeout_graceful_shutdown=shutdown_timeout,
                                           timeout_keep_alive=KEEP_ALIVE_S, lifespan="on", **http.uvicorn_kwargs()),
                            drain, grace=shutdown_timeout, engine=engine, engine_death_exit_s=engine_death_exit_s)
    # SIGTERM/SIGINT first drain (new requests get 503, in-flight ones finish; see ``draining``), then uvicorn
    # stops accepting and runs the lifespan shut-down, and re-raises the signal into the handlers found before it
    # started: make those harmless, so a requested shut-down ends with exit status 0.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    freeze_startup_heap("server")  # the front end's tokenizer, the app's routes and schemas (the core freezes its own)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()
    if not server.started:
        logger.error("the server did not start (%s)", f"can the socket {http.uds} be made?" if http.uds
                     else f"is port {port} free?")
        return 1
    return server.exit_code  # 1 when the engine died


def _load_engine(config, max_queued_requests: int | None, in_process: bool) -> tuple[AsyncEngine, dict]:
    """The server's engine (core in a child process, or in a thread here) and facts for the start-up log."""
    if config.data_parallel_size > 1:
        if in_process:
            raise ValueError("--engine-in-process runs one engine in the server's process; data-parallel "
                             "replicas run in processes of their own (leave out one of the two options)")
        build = AsyncEngine.data_parallel
    else:
        build = AsyncEngine.in_thread if in_process else AsyncEngine.in_child_process
    engine = build(config, max_queued_requests=max_queued_requests)
    info = engine.info
    facts = {"name": info.model_name, "path": info.model_path, "architectures": info.architectures,
             "dtype": info.dtype, "device": info.device, "num_blocks": info.num_blocks,
             "block_size": info.block_size, "kv_bytes_per_block": info.kv_bytes_per_block}
    return engine, facts


def lora_registry(config: EngineConfig, served_names: list[str], modules: list[LoraModule]) -> LoRARegistry | None:
    """The served adapters (``--lora-modules``, checked against the model now) when LoRA is on, else None."""
    if not config.enable_lora:
        return None
    from inferneo.model_executor.models.registry import get_model_class
    from inferneo.model_loader import load_hf_config

    hf_config = load_hf_config(config.model_ref().resolve(), config.hf_overrides)
    registry = LoRARegistry(get_model_class(hf_config).config_from_hf(hf_config), config.max_lora_rank,
                            served_names)
    for module in modules:
        registry.add(module.name, module.path, module.base_model_name)
    return registry


def _ignore_signal(signum: int, frame: Any) -> None:
    logger.debug("signal %d after shut-down ignored", signum)
