"""The front end of the engine: text in, text out, around the token-level core.

It loads the model and tokenizer, turns prompts into token ids, checks them, fans ``n > 1`` out into sibling
sequences, and after each core step detokenizes, applies stop strings and assembles ``RequestOutput`` objects.
The offline ``LLM``, the HTTP server and the batch runner all sit on this one class.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import psutil
import torch

from inferneo.config import EngineConfig
from inferneo.engine.core import EngineCore
from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.output_processor import OutputProcessor
from inferneo.engine.request import Request
from inferneo.engine.scheduler import Scheduler
from inferneo.model_loader import (
    iter_weights,
    load_generation_config,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from inferneo.outputs import RequestOutput
from inferneo.sampling_params import SamplingParams
from inferneo.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_DEFAULT = 4 * 2**30
_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LLMEngine:
    """Loads a model and serves generation requests through continuous batching."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.source = resolve_model(config.model)
        self.hf_config = load_hf_config(self.source)
        self.generation_config = load_generation_config(self.source)
        self.tokenizer = load_tokenizer(self.source, config.tokenizer)
        self.device = config.torch_device
        checkpoint_dtype = _checkpoint_dtype(self.hf_config)
        self.dtype = config.torch_dtype(checkpoint_dtype)
        self.max_model_len = self._resolve_max_model_len()

        runner_kwargs = dict(hf_config=self.hf_config, dtype=self.dtype, device=self.device,
                             max_model_len=self.max_model_len, block_size=config.block_size,
                             enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs)
        if config.tensor_parallel_size > 1:
            from inferneo.worker.tensor_parallel import TensorParallelRunner

            self.runner = TensorParallelRunner(config.tensor_parallel_size, config.model,
                                               num_threads=config.num_threads, **runner_kwargs)
        else:
            self.runner = ModelRunner(**runner_kwargs)
        self.vocab_size = self.runner.model_config.vocab_size
        if config.load_format == "dummy":
            self.runner.init_dummy_weights(config.seed)
        else:
            self.runner.load_weights(iter_weights(self.source))
        self.runner.finalize_weights()

        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        max_batched = config.max_num_batched_tokens or (2048 if config.enable_chunked_prefill else self.max_model_len)
        if not config.enable_chunked_prefill and max_batched < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) must be >= max_model_len ({self.max_model_len}) "
                "when chunked prefill is off"
            )
        self.scheduler = Scheduler(
            self.kv_cache,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max_batched,
            policy=config.scheduling_policy,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        async_scheduling = config.async_scheduling
        if async_scheduling is None:  # measured faster on H100s at TP 1 and 2 (docs/benchmarks.md); no gain on CPU
            async_scheduling = self.device.type == "cuda"
        self.core = EngineCore(self.runner, self.scheduler, self.max_model_len, async_scheduling=async_scheduling)
        self.eos_token_ids = eos_token_ids(self.generation_config, self.tokenizer)
        self.processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()
        logger.info(
            "model %s: %s, dtype %s on %s, max_model_len %d, KV cache %d blocks of %d tokens (%.2f GiB)",
            self.source.name, self.hf_config.get("architectures"), self.dtype, self.device, self.max_model_len,
            num_blocks, config.block_size, num_blocks * self.runner.kv_bytes_per_block / 2**30,
        )

    # ---- set-up ------------------------------------------------------------------------------------------

    def _resolve_max_model_len(self) -> int:
        cfg = self.hf_config
        limit = cfg.get("max_position_embeddings") or 2048
        if cfg.get("sliding_window") and (cfg.get("use_sliding_window", True)) and cfg["sliding_window"] < limit:
            limit = cfg["sliding_window"]  # sliding-window attention is not implemented: stay within the window
        asked = self.config.max_model_len
        if asked is None:
            return limit
        if asked > limit:
            raise ValueError(f"max_model_len ({asked}) is larger than the model's context length ({limit})")
        return asked

    def _num_kv_blocks(self) -> int:
        per_block = self.runner.kv_bytes_per_block
        memory = self.config.kv_cache_memory
        if memory is None:
            if self.device.type == "cuda":
                max_batched = self.config.max_num_batched_tokens or (
                    2048 if self.config.enable_chunked_prefill else self.max_model_len)
                memory = self.runner.profile_kv_memory(max_batched, self.config.gpu_memory_utilization)
            else:
                memory = min(_CPU_KV_CACHE_DEFAULT, psutil.virtual_memory().available // 4)
        blocks_per_seq = math.ceil(self.max_model_len / self.config.block_size)
        num_blocks = min(memory // per_block, blocks_per_seq * self.config.max_num_seqs)
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory of {memory} bytes holds {memory // per_block} blocks; "
                f"one block of {self.config.block_size} tokens needs {per_block} bytes"
            )
        return int(num_blocks)

    def shutdown(self) -> None:
        """Stop helper processes (tensor-parallel workers); the engine cannot step afterwards."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_cache.num_blocks * self.config.block_size

    def default_sampling_params(self) -> SamplingParams:
        """Sampling defaults from the model's ``generation_config.json`` (as vLLM does), else the usual ones."""
        return default_sampling_params(self.generation_config)

    # ---- requests ----------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for a prompt the model cannot take."""
        params = params or self.default_sampling_params()
        request_id = request_id if request_id is not None else str(next(self._counter))
        if request_id in self.processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, prompt_ids = prompt, self.tokenize(prompt)
        else:
            text, prompt_ids = None, list(prompt)
            bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if (error := params.logit_bias_error(self.vocab_size)) is not None:
            raise ValueError(error)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context length is {self.max_model_len}: "
                "shorten the prompt"
            )
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        if len(prompt_ids) + max_tokens > self.kv_capacity_tokens:
            raise ValueError(
                f"the request needs up to {len(prompt_ids) + max_tokens} tokens of KV cache but the cache holds "
                f"{self.kv_capacity_tokens}: lower max_tokens or give the cache more memory"
            )
        if params.logprobs is not None and params.logprobs > 20:
            raise ValueError(f"logprobs must be at most 20, got {params.logprobs}")
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        parent, specs = self.processor.prepare(request_id, text, prompt_ids, params, max_tokens,
                                               self.eos_token_ids, priority, arrival)
        core_requests = [Request(*spec) for spec in specs]
        # Every sequence was built (building is what can fail); only now do they enter the engine, all together.
        for core_request in core_requests:
            self.core.add_request(core_request)
        self.processor.register(parent)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks. Unknown or finished ids are ignored."""
        ids = self.processor.abort(request_id)
        if ids:
            self.core.abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.parents)

    def running_request_ids(self) -> list[str]:
        """Ids of the requests with a sequence in the running batch (those a failed step may have touched)."""
        ids: dict[str, None] = {}
        for request in self.scheduler.running:
            parent_id = self.processor.parent_id(request.request_id)
            if parent_id is not None:
                ids[parent_id] = None
        return list(ids)

    # ---- stepping ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the state of every request that advanced in it."""
        outputs, to_abort = self.processor.process(self.core.step())
        if to_abort:  # stop strings found by the front end
            self.core.abort_requests(to_abort)
        return outputs


def default_sampling_params(generation_config: dict) -> SamplingParams:
    """Sampling defaults from a model's ``generation_config.json`` (as vLLM does), else the usual ones."""
    values = {k: generation_config[k] for k in _SAMPLING_DEFAULT_KEYS if k in generation_config}
    if "temperature" in values and not generation_config.get("do_sample", True):
        values["temperature"] = 0.0
    try:
        return SamplingParams(**values)
    except ValueError:
        return SamplingParams()


def _checkpoint_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def eos_token_ids(generation_config: dict, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    eos = generation_config.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(e for e in eos if isinstance(e, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)

