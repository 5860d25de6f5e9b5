"""The offline front end: text in, finished text out, with the core stepped in the caller's thread.

``LLM`` sits on this class. It checks and tokenizes requests (``InputProcessor``), fans ``n > 1`` out into
sibling sequences and turns core outputs into finished ``RequestOutput`` objects (``OutputProcessor``); the core
runs turn by turn through an ``InlineCoreClient``, the same core loop the server's engine runs in a thread or a
child process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import torch

from inferneo.config import EngineConfig
from inferneo.engine.core_client import InlineCoreClient
from inferneo.engine.input_processor import FrontEndFacts, InputProcessor, check_cache_salt, truncate_prompt
from inferneo.engine.output_processor import OutputKind, OutputProcessor
from inferneo.engine.protocol import (
    AbortRequests,
    AddRequests,
    ControlCommand,
    ControlReply,
    EngineSleepingError,
    InvalidRequestError,
    LoraRef,
    PoolingRequest,
    ResetPrefixCache,
    Sleep,
    UpdateWeights,
    WakeUp,
)
from inferneo.engine.weight_transfer import to_wire_all
from inferneo.outputs import EmbeddingRequestOutput, RequestOutput
from inferneo.sampling_params import SamplingParams


class LLMEngine(FrontEndFacts):
    """Loads a model and generates for many requests at once, in the caller's thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core_client = InlineCoreClient.from_config(config)
        self.info = self.core_client.info
        tokenizer, generation_config = InputProcessor.load_tokenizer(config)
        self.input = InputProcessor(tokenizer, generation_config, self.info,
                                    InputProcessor.load_image_prompts(config, tokenizer))
        self.processor = OutputProcessor(tokenizer)
        self._counter = itertools.count()
        self._call_ids = itertools.count(1)
        self._sleeping = False

    # ---- facts -------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def device(self) -> str:
        return self.info.device

    # The in-process core's parts, for tests, benchmarks and tools that look inside a running engine.

    @property
    def core(self):
        return self.core_client.core

    @property
    def runner(self):
        return self.core_client.core.runner

    @property
    def scheduler(self):
        return self.core_client.core.scheduler

    @property
    def kv_cache(self):
        return self.core_client.core.scheduler.kv_cache

    def shutdown(self) -> None:
        """Stop helper processes (tensor-parallel workers); the engine cannot step afterwards."""
        self.core_client.close()

    # ---- weights, prefix cache and sleep mode (``engine.engine_control`` has the rules) --------------------

    def _control(self, command: ControlCommand) -> ControlReply:
        reply = self.core_client.call(command)
        self._sleeping = reply.sleeping
        reply.raise_if_refused()
        return reply

    def reset_prefix_cache(self) -> bool:
        """Forget every prefix-cache block no running request holds; True when none is left cached."""
        return self._control(ResetPrefixCache(next(self._call_ids))).value

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load ``(name, tensor)`` pairs (Hugging Face names) into the model, all or none, then reset the prefix
        cache. Raises ``ValueError`` for an unknown name, a wrong shape or weights that cannot be updated, and
        ``EngineBusyError`` while requests are unfinished or the engine sleeps."""
        self._control(UpdateWeights(next(self._call_ids), to_wire_all(weights)))

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1; on CUDA the weights go to host memory) or drop the weights too (level 2);
        ``EngineBusyError`` while requests are unfinished."""
        self._control(Sleep(next(self._call_ids), level))

    def wake_up(self) -> None:
        """End sleep mode (after level 2 the weights must be loaded again with ``update_weights``)."""
        self._control(WakeUp(next(self._call_ids)))

    def is_sleeping(self) -> bool:
        return self._sleeping

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int] | None,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora: LoraRef | None = None,
        prompt_text: str | None = None,
        cache_salt: str | None = None,
        images: list | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ``InvalidRequestError`` (a ``ValueError``) for a request the
        model cannot take (``InputProcessor``'s rules, the same as the server's). ``prompt_text``: the text that
        token-id ``prompt`` was made from (a rendered chat), reported as the output's ``prompt``. ``cache_salt``:
        the request's prefix-cache blocks serve only requests with the same salt (vLLM's). ``images``: a
        vision-language model's images (PIL images or image URLs), one for each image placeholder of the prompt
        (``ImagePrompts.prepare``). ``prompt_embeds`` (with ``prompt`` None): the prompt given as embeddings,
        ``[num_tokens, hidden_size]`` (``InputProcessor.prepare_prompt_embeds``; the engine must be started with
        ``enable_prompt_embeds``)."""
        if self._sleeping:
            raise EngineSleepingError()
        params = params or self.default_sampling_params()
        request_id = request_id if request_id is not None else str(next(self._counter))
        if request_id in self.processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        embeds = None
        if prompt_embeds is not None:
            if prompt is not None or images:
                raise InvalidRequestError("a prompt given as embeddings takes no text, token ids or images besides",
                                          "prompt_embeds")
            params = self.input.resolve(params)
            text, image_inputs = None, None
            prompt_ids, embeds = self.input.prepare_prompt_embeds(prompt_embeds, params, params.truncate_prompt_tokens)
            max_tokens = self.input.check(prompt_ids, params, "prompt_embeds", priority)
        else:
            if isinstance(prompt, str):
                text, prompt_ids = prompt, self.input.tokenize(prompt)
            else:
                text, prompt_ids = prompt_text, list(prompt)
            params = self.input.resolve(params)
            prompt_ids, image_inputs = self.input.prepare_images(prompt_ids, images, params.truncate_prompt_tokens)
            prompt_ids = truncate_prompt(prompt_ids, params.truncate_prompt_tokens, self.input.limits.max_model_len,
                                         params.max_tokens)
            max_tokens = self.input.check(prompt_ids, params, priority=priority)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        parent, specs = self.processor.prepare(request_id, text, prompt_ids, params, max_tokens,
                                               self.input.eos_token_ids, priority, arrival, OutputKind.FINAL,
                                               lora, check_cache_salt(cache_salt), image_inputs, embeds)
        self.core_client.send(AddRequests(specs))
        self.processor.register(parent)
        return request_id

    def add_embedding_request(self, request_id: str | None, prompt: str | list[int],
                              pooling: PoolingRequest | None = None, priority: int = 0) -> str:
        """Queue an embedding request (its step output is an ``EmbeddingRequestOutput``); returns its id. Raises
        ``InvalidRequestError`` as ``InputProcessor.check_embedding`` says."""
        if self._sleeping:
            raise EngineSleepingError()
        pooling = pooling or PoolingRequest()
        request_id = request_id if request_id is not None else str(next(self._counter))
        if request_id in self.processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.input.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.input.check_embedding(prompt_ids, pooling, "prompt", priority)
        parent, specs = self.processor.prepare_embedding(request_id, prompt_ids, pooling, priority,
                                                         time.monotonic())
        self.core_client.send(AddRequests(specs))
        self.processor.register(parent)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored."""
        ids = self.processor.abort(request_id)
        if ids:
            self.core_client.send(AbortRequests(ids))

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.parents)

    # ---- stepping ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """Run one engine step; returns the requests that finished in it.

        Raises ``RequestFailedError`` if the step failed (its requests are dropped; the caller decides whether
        to go on), ``EngineDeadError`` when the core cannot go on.
        """
        step = self.core_client.turn()
        if step.failures:
            for failure in step.failures:
                for core_id in failure.request_ids:
                    request_id = self.processor.parent_id(core_id)
                    if request_id is not None:
                        self.abort_request(request_id)
            raise step.failures[0].to_exception()
        outputs, to_abort = self.processor.process(step.outputs)
        if to_abort:  # stop strings found by the front end
            self.core_client.send(AbortRequests(to_abort))
        return outputs
