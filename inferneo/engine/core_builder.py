"""Builds an engine core from an ``EngineConfig``: the model and its weights, the KV cache, the scheduler.

No tokenizer is loaded here: the core sees token ids only (the grammar compiler loads one on its own thread the
first time a request asks for structured output). The same function builds the core whichever client
drives it (in this thread, a background thread, or a child process).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import msgspec
import psutil
import torch

from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.engine.core import EngineCore
from inferneo.engine.fingerprint import core_fingerprint
from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.protocol import PROMPT_EMBEDS_OFF, CoreInfo
from inferneo.engine.scheduler import Scheduler
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader import iter_weights, load_hf_config, load_tokenizer
from inferneo.multimodal.config import vision_language_of
from inferneo.pooling import lacks_output_head, load_classifier_config, load_pooling_config
from inferneo.structured_output.compiler import GrammarCompiler
from inferneo.worker.memory import warm_up
from inferneo.worker.model_runner import ModelRunner
from inferneo.worker.runner_api import Runner

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_DEFAULT = 4 * 2**30


def build_engine_core(config: EngineConfig) -> tuple[EngineCore, CoreInfo]:
    """Load the model named by ``config`` and build a core around it; returns the core and its facts."""
    if config.data_parallel_size > 1:
        raise ValueError(f"data_parallel_size {config.data_parallel_size}: data-parallel replicas are served by "
                         "`inferneo serve --data-parallel-size N`; one engine here runs one replica")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    source = config.model_ref().resolve()
    _check_load_format(config.load_format, config.model, source)
    hf_config = load_hf_config(source, config.hf_overrides)
    encoder = is_encoder(hf_config)
    classifier = is_classifier(hf_config)
    if classifier and config.pipeline_parallel_size > 1:  # it would serve nothing: pooling is not served at PP > 1
        raise ValueError(f"pipeline_parallel_size {config.pipeline_parallel_size}: a sequence classifier is not "
                         "served with pipeline parallelism (its pooled last tokens stay on the last stage); use "
                         "tensor parallelism")
    if encoder:  # a BERT-family encoder: embeddings (or scores) only, each input whole in one step, no KV cache
        _check_encoder_options(config)
        generates = False
    else:  # a decoder sequence classifier has no lm_head (its class ties one it never reads): it does not generate
        generates = not classifier and not lacks_output_head(source, hf_config)
    if not (generates or encoder or classifier):  # an embedding checkpoint saved without lm_head: load, no generating
        logger.info("%s has no lm_head: it serves embeddings only", source.name)
        hf_config = {**hf_config, "tie_word_embeddings": True}
    device = config.torch_device
    dtype = config.torch_dtype(_checkpoint_dtype(hf_config))
    if encoder:
        max_model_len = resolve_max_model_len(hf_config, config.max_model_len,
                                              encoder_max_len(hf_config, source.path if source.kind == "hf_dir"
                                                              else None))
        # every input runs whole in one step: a step must hold the longest
        max_batched = max(config.max_num_batched_tokens or 2048, max_model_len)
    else:
        max_model_len = resolve_max_model_len(hf_config, config.max_model_len)
        max_batched = config.max_num_batched_tokens or (2048 if config.enable_chunked_prefill else max_model_len)
    images = vision_language_of(hf_config)
    whole_images = images is not None and images.bidirectional_images
    if whole_images and max_batched < images.num_image_tokens:  # one image's tokens are computed in one step
        raise ValueError(f"max_num_batched_tokens ({max_batched}) must be >= the {images.num_image_tokens} tokens "
                         f"of one image for {images.architecture}, whose image tokens attend to each other")

    runner_kwargs = dict(hf_config=hf_config, dtype=dtype, device=device, max_model_len=max_model_len,
                         block_size=config.block_size, enforce_eager=config.enforce_eager or encoder,
                         max_num_seqs=config.max_num_seqs, kernels=config.kernels,
                         quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype,
                         max_decode_rows=_max_decode_rows(config, max_batched))
    runner: Runner
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from inferneo.worker.tensor_parallel import TensorParallelRunner

        runner = TensorParallelRunner(config.tensor_parallel_size, config.model_ref(), num_threads=config.num_threads,
                                      pipeline_parallel_size=config.pipeline_parallel_size,
                                      executor_backend=config.distributed_executor_backend, **runner_kwargs)
    else:
        runner = ModelRunner(**runner_kwargs)
    try:
        if config.load_format == "dummy":
            runner.init_dummy_weights(config.seed)
        else:
            runner.load_weights(iter_weights(source))
        runner.finalize_weights()

        if not config.enable_chunked_prefill and max_batched < max_model_len and not encoder:
            raise ValueError(f"max_num_batched_tokens ({max_batched}) must be >= max_model_len ({max_model_len}) "
                             "when chunked prefill is off")
        lora_slots = _enable_lora(config, runner, max_batched)
        if encoder:  # no KV at all: the blocks only count the tokens of the inputs in a step
            num_blocks = math.ceil(max_model_len / config.block_size) * config.max_num_seqs
        else:
            num_blocks = _num_kv_blocks(config, runner, device, max_model_len, max_batched)
        runner.allocate_kv_cache(num_blocks)
        if device.type == "cpu" and isinstance(runner, ModelRunner):
            seconds = warm_up(runner, max_batched, config.max_num_seqs)
            logger.info("warm-up pass over %d tokens: %.2f s", max_batched, seconds)
    except BaseException:
        runner.shutdown()
        raise
    # An encoder's input is never split over steps (its attention sees the whole input at once) and has no KV to
    # cache.
    kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching and not encoder,
                              runner.rope_switch)
    scheduler = Scheduler(kv_cache, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
                          policy=config.scheduling_policy,
                          enable_chunked_prefill=config.enable_chunked_prefill and not encoder,
                          whole_images=whole_images)
    async_scheduling = config.async_scheduling
    if async_scheduling is None:  # measured faster on H100s at TP 1 and 2 (docs/benchmarks.md); no gain on CPU
        # Speculation drafts from the tokens of the step before, so it schedules synchronously.
        async_scheduling = device.type == "cuda" and config.speculative_config is None
    vocab_size = runner.model_config.vocab_size
    grammars = GrammarCompiler(lambda: load_tokenizer(source, config.tokenizer_ref()), vocab_size)
    if classifier:  # a sequence classifier: it classifies, and with one label scores pairs
        pooling = load_classifier_config(hf_config, runner.model_config.num_labels,
                                         method="cls" if encoder else "last")
    else:
        pooling = load_pooling_config(source.path if source.kind == "hf_dir" else None, hf_config,
                                      runner.model_config.hidden_size, default_method="cls" if encoder else "last")
    if config.pipeline_parallel_size > 1:
        async_scheduling = False  # the pipeline keeps its own steps in flight, one per stage
        # Pooling reads the last stage's hidden states, which stay on that stage: not served at PP > 1 yet.
        pooling = msgspec.structs.replace(pooling, unsupported="embeddings, classes and scores are not served with "
                                          "pipeline parallelism (--pipeline-parallel-size > 1)")
    core = EngineCore(runner, scheduler, max_model_len, async_scheduling=async_scheduling, grammars=grammars,
                      vocab_size=vocab_size, pooling=pooling, pipeline_depth=config.pipeline_parallel_size,
                      speculative=config.speculative_config)
    spec = config.speculative_config
    if spec is not None:
        logger.info("speculative decoding: %s, up to %d drafts a step (lookup of %d-%d tokens)%s", spec.method,
                    spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max,
                    "" if spec.disable_by_batch_size is None
                    else f", none while more than {spec.disable_by_batch_size} requests run")
    if lora_slots is not None:
        core.lora_slots = lora_slots
        lora_slots.live_ids = core.live_lora_ids
        scheduler.max_loras = config.max_loras
    _install_test_fault(core)
    prompt_embeds_refusal = _prompt_embeds_refusal(config, runner, generates)
    if prompt_embeds_refusal is None:
        runner.take_prompt_embeds()
    elif config.enable_prompt_embeds:
        logger.warning("enable_prompt_embeds is set, but prompt embeddings will be refused: %s", prompt_embeds_refusal)
    info = CoreInfo(model_name=source.name, model_path=str(source.path),
                    architectures=list(hf_config.get("architectures") or []), max_model_len=max_model_len,
                    vocab_size=runner.model_config.vocab_size, num_blocks=num_blocks, block_size=config.block_size,
                    kv_bytes_per_block=runner.kv_bytes_per_block, dtype=str(dtype).removeprefix("torch."),
                    device=str(device), pid=os.getpid(), pooling=pooling, generates=generates,
                    scores_prompts=config.pipeline_parallel_size == 1,
                    schedules_by_priority=config.scheduling_policy == "priority",
                    max_logprobs=config.max_logprobs, hidden_size=runner.model_config.hidden_size,
                    prompt_embeds_refusal=prompt_embeds_refusal,
                    fingerprint=core_fingerprint(source.kind, source.path, {
                        "dtype": str(dtype), "quantization": config.quantization,
                        "kv_cache_dtype": config.kv_cache_dtype, "hf_overrides": config.hf_overrides,
                        "load_format": config.load_format, "seed": config.seed if config.load_format == "dummy"
                        else None}))
    logger.info("model %s: %s, dtype %s on %s, max_model_len %d, KV cache %d blocks of %d tokens (%.2f GiB)",
                source.name, info.architectures, info.dtype, device, max_model_len, num_blocks, config.block_size,
                num_blocks * runner.kv_bytes_per_block / 2**30)
    return core, info


def _prompt_embeds_refusal(config: EngineConfig, runner: Runner, generates: bool) -> str | None:
    """Why this core refuses prompts given as embeddings (``CoreInfo.prompt_embeds_refusal``); None: it takes them."""
    if not config.enable_prompt_embeds:
        return PROMPT_EMBEDS_OFF
    if config.pipeline_parallel_size > 1:
        return "prompt embeddings run without pipeline parallelism for now (pipeline_parallel_size 1)"
    if not generates:
        return "this model does not generate: it cannot take prompt embeddings"
    if not runner.takes_prompt_embeds:
        return "this model's architecture does not take prompt embeddings"
    return None


def shutdown_core(core: EngineCore) -> None:
    """Stop the core's helper processes (tensor-parallel workers) and threads; it cannot step afterwards."""
    if core.grammars is not None:
        core.grammars.shutdown()
    core.runner.shutdown()


def resolve_max_model_len(hf_config: dict, asked: int | None, limit: int | None = None) -> int:
    """The context length: the one asked for, checked against the model's (``limit``, else its
    ``max_position_embeddings``), else the model's.

    A sliding window does not shorten it: the attention layers enforce their windows (each query sees only its
    last ``sliding_window`` keys), while the KV cache still keeps every token of a request, so a windowed model
    costs as much cache memory per token as a full-attention one (freeing blocks behind the window is not done).
    """
    limit = limit or hf_config.get("max_position_embeddings") or 2048
    if asked is None:
        return limit
    if asked > limit:
        raise ValueError(f"max_model_len ({asked}) is larger than the model's context length ({limit})")
    return asked


def is_encoder(hf_config: dict) -> bool:
    """Whether ``hf_config``'s architecture is a BERT-family encoder (``models/bert.py``, and the cross-encoders of
    ``models/cross_encoder.py``): it embeds or scores, and never generates."""
    return bool(getattr(get_model_class(hf_config), "is_encoder", False))


def is_classifier(hf_config: dict) -> bool:
    """Whether ``hf_config``'s architecture is a sequence classifier (a cross-encoder of ``models/cross_encoder.py``
    or a decoder of ``models/decoder_classifier.py``): its pooled rows go through its head to logits."""
    return hasattr(get_model_class(hf_config), "classify")


def encoder_max_len(hf_config: dict, model_dir: Path | None) -> int:
    """The longest input an encoder takes: what its position embeddings cover (RoBERTa's start past the padding
    index: 514 positions hold 512 tokens), and at most the ``max_seq_length`` of its sentence-transformers
    ``sentence_bert_config.json`` (as vLLM reads it; sentence-transformers cuts inputs there)."""
    limit = get_model_class(hf_config).config_from_hf(hf_config).max_input_tokens
    st_file = model_dir / "sentence_bert_config.json" if model_dir is not None else None
    if st_file is not None and st_file.is_file():
        try:
            st_max = json.loads(st_file.read_text()).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            st_max = None
        if isinstance(st_max, int) and not isinstance(st_max, bool) and st_max > 0:
            limit = min(limit, st_max)
    return limit


def _check_encoder_options(config: EngineConfig) -> None:
    """ValueError for an engine option an encoder does not take (it runs on one rank, in full precision)."""
    refused = {"tensor_parallel_size > 1": config.tensor_parallel_size > 1,
               "pipeline_parallel_size > 1": config.pipeline_parallel_size > 1,
               "enable_lora": config.enable_lora, "speculative_config": config.speculative_config is not None,
               "quantization": config.quantization is not None, "kv_cache_dtype": config.kv_cache_dtype != "auto"}
    if asked := [name for name, on in refused.items() if on]:
        raise ValueError(f"{', '.join(asked)}: not supported for BERT-family encoder models (embeddings only, run "
                         "on one rank in full precision)")


def _max_decode_rows(config: EngineConfig, max_batched: int) -> int:
    """Decode rows a step may run: one per request, and with speculative decoding one per draft token too (draft
    verification runs as decode rows, so its steps replay CUDA graphs), within the step's token budget."""
    speculative = config.speculative_config
    if speculative is None:
        return config.max_num_seqs
    return max(config.max_num_seqs,
               min(config.max_num_seqs * (1 + speculative.num_speculative_tokens), max_batched))


def _num_kv_blocks(config: EngineConfig, runner, device: torch.device, max_model_len: int,
                   max_batched: int) -> int:
    per_block = runner.kv_bytes_per_block
    memory = config.kv_cache_memory
    if memory is None:
        if device.type == "cuda":
            memory = runner.profile_kv_memory(max_batched, config.gpu_memory_utilization)
        else:
            memory = min(_CPU_KV_CACHE_DEFAULT, psutil.virtual_memory().available // 4)
    blocks_per_seq = math.ceil(max_model_len / config.block_size)
    num_blocks = min(memory // per_block, blocks_per_seq * config.max_num_seqs)
    if num_blocks < 2:
        raise ValueError(f"kv_cache_memory of {memory} bytes holds {memory // per_block} blocks; "
                         f"one block of {config.block_size} tokens needs {per_block} bytes")
    return int(num_blocks)


def _enable_lora(config: EngineConfig, runner: Runner, max_batched: int):
    """The runner's LoRA slots when ``config.enable_lora`` (a tensor-parallel runner refuses), else None."""
    if not config.enable_lora:
        return None
    return runner.enable_lora(config.max_loras, config.max_lora_rank, config.max_cpu_loras or config.max_loras,
                              max_batched)


def _checkpoint_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _install_test_fault(core: EngineCore) -> None:
    """The INFERNEO_TEST_FAULT hook (see ``envs.test_fault``): wrap the runner so that chosen steps raise."""
    spec = envs.test_fault()
    if not spec:
        return
    logger.warning("INFERNEO_TEST_FAULT=%s: model steps will fail on purpose", spec)
    always = spec == "always"
    poison = [] if always else [int(t) for t in spec.removeprefix("prompt:").split(",")]
    runner = getattr(core.runner, "driver", core.runner)  # the rank-0 ModelRunner behind a TP runner
    launch = runner.launch

    def faulty_launch(step, previous=None):
        if always or any(seq.token_ids[: len(poison)] == poison for seq in step.sequences):
            raise RuntimeError("injected fault (INFERNEO_TEST_FAULT)")
        return launch(step, previous)

    runner.launch = faulty_launch  # ``execute`` (synchronous scheduling) goes through ``launch`` as well


def _check_load_format(load_format: str, model: object, source) -> None:
    """A ``load_format`` that names the other format than the checkpoint's is refused (it would otherwise be read
    in its own format without a word), as is an architecture preset without ``dummy`` (it has no weights)."""
    from inferneo.model_executor.arch_presets import preset_name

    if isinstance(model, str) and preset_name(model) is not None and load_format != "dummy":
        raise ValueError(f"{model} is an architecture preset: it has no weights, so it needs load_format='dummy' "
                         "(--load-format dummy: random weights of the real shapes)")
    if load_format not in ("safetensors", "gguf"):
        return
    if source.kind == "gguf":
        found = "gguf"
    else:
        found = "safetensors" if any(source.path.glob("*.safetensors")) else "PyTorch .bin"
    if load_format != found:
        raise ValueError(f"load_format {load_format!r}, but {source.name} is a {found} checkpoint ({source.path}); "
                         f"use load_format='auto', or point the model at a {load_format} checkpoint")
