"""The model runner: owns the model and the KV tensors, packs a step into one forward pass, samples.

It knows nothing of queues, policies or requests: it receives a plain ``StepRecord`` (per sequence: its token
ids, how many are computed and how many run now, its KV blocks, its sampling row) and returns one sampled token
for every sequence the step samples.

A step's inputs are packed with numpy into one host buffer and reach the device in one copy
(``step_inputs``, ``staging``); sampling is batched on the device and the sampled ids come back in the step's
single device-to-host sync. On CUDA, decode-only steps replay captured graphs padded to a batch-size bucket
(``cuda_graphs``); the padding logic is plain numpy and also runs on CPU when ``decode_buckets`` is set.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from inferneo.attention import backend_for_model, default_attention_backend, get_attention_backend
from inferneo.attention.fp8_kv import FP8_KV_DTYPE
from inferneo.attention.kv_spec import allocate_kv_caches, kv_bytes_per_block
from inferneo.distributed import PipelineGroup, TensorParallelGroup
from inferneo.engine.protocol import PromptLogprobs
from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu import argmax_rows_for
from inferneo.lora.slots import LoRAStep
from inferneo.model_executor.device_kernels import use_device_kernels
from inferneo.model_executor.layers.rotary import model_rope_switch, share_rotary_tables
from inferneo.model_executor.models.interface import CausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_executor.pipeline import (
    PipelineStage,
    keep_stage,
    renumber_stage_weights,
    stage_forward,
    stage_layer_ranges,
    stage_weights,
)
from inferneo.model_executor.tensor_parallel import materialize, shard_model
from inferneo.pooling.pooler import apply_head, pool_step
from inferneo.quantization import (
    finalize_quantized_linears,
    quantize_linears,
    quantized_experts,
    quantized_linears,
    resolve_quant_config,
)
from inferneo.quantization.base import is_quantized_parameter
from inferneo.quantization.kv_cache import (
    CheckpointKVScales,
    check_fp8_kv_cache_supported,
    install_kv_scales,
    kv_cache_torch_dtype,
)
from inferneo.sampling import Sampler, SamplingMetadata
from inferneo.worker.cpu_tuning import keep_freed_memory_mapped, release_freed_memory
from inferneo.worker.cuda_graphs import DecodeGraphs, decode_buckets, pick_bucket
from inferneo.worker.memory import kv_cache_budget, profile_peak_memory
from inferneo.worker.mrope_step import apply_mrope_positions
from inferneo.worker.prompt_logprobs import PromptScores, gather_prompt_rows, score_prompt_rows
from inferneo.worker.runner_api import Runner
from inferneo.worker.staging import InputStager
from inferneo.worker.step_inputs import (
    PackedStep,
    ScheduledSequence,
    StepRecord,
    decode_extent,
    pack_step,
    pooling_rows_of,
    step_layout,
    step_views,
)
from inferneo.worker.weight_update import ParkedWeights, park_weights, plain_weights

# Images whose features the runner keeps (most recently used), so that a prompt's chunks encode each image once.
IMAGE_FEATURE_CACHE = 32

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RemoteStep:
    """What a tensor-parallel worker needs to run a step: the packed input buffer and how to slice it."""

    host: np.ndarray
    packed: PackedStep
    bucket: int | None
    num_samples: int
    # With asynchronous scheduling: how many tokens the previous step sampled, when this step reads some of them
    # (the driver broadcasts them on the devices before the forward pass); 0 otherwise.
    num_previous_samples: int = 0
    # Rows of the hidden states whose prompt log-probabilities the driver computes (the LM head is sharded, so
    # every rank runs them through its shard); None when no sequence of the step asked.
    prompt_rows: np.ndarray | None = None
    # With LoRA enabled: the adapters of the step's sequences (every rank prepares the same batch); None otherwise.
    lora: LoRAStep | None = None
    # Qwen2-VL's ``[3, num_tokens]`` positions of a step with image tokens (``mrope_step``); None otherwise.
    mrope: np.ndarray | None = None
    # Rows whose embeddings are given, ``(first row, count)`` each (image features, prompt embeddings): the driver
    # broadcasts them, concatenated, after the step; empty when none.
    embedded: list[tuple[int, int]] = field(default_factory=list)
    # Each image's rows among them, ``(first row, count)`` (Gemma 3's bidirectional image blocks).
    image_blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class RunnerOutput:
    """Tokens sampled this step, in the order of the step's sampled sequences (``StepRecord.sampling_rows``)."""

    sampled_token_ids: list[int]
    logprob_token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None
    sampled_token_ranks: list[int] | None = None
    # Embedding requests: each pooling sequence's partial (``inferneo.pooling.pooler``), in step order, on the host.
    pooled: list[torch.Tensor | None] | None = None
    # Scored prompt positions of the step, in the order of its sequences with a ``prompt_logprobs`` span, each
    # row as wide as the step's largest request (``PromptScores``); None when no sequence asked.
    prompt_logprobs: PromptLogprobs | None = None


class InFlightStep:
    """A launched step. Its sampled ids stay on the device, where the next step can read them as inputs, while a
    copy travels to the host; ``resolve`` waits for that copy alone (not for later work queued behind it)."""

    def __init__(self, num_samples: int, result=None, prompt_scores: PromptScores | None = None) -> None:
        self.num_samples = num_samples
        self.sampled: torch.Tensor | None = None
        self._tensors: list[torch.Tensor] = []
        self._event = None
        self._resolved: RunnerOutput | None = None
        self.pooled: list[torch.Tensor | None] | None = None  # set by the runner for steps with pooling rows
        self._num_logprob_tensors = 0
        self._has_prompt_scores = False
        self._hold(result, prompt_scores)

    def _hold(self, result, prompt_scores: PromptScores | None = None) -> None:
        """Keep the sampler's ``result`` (and the step's prompt scores); on CUDA their copy to the host starts
        now."""
        if result is not None:
            self.sampled = result.sampled_token_ids.contiguous()
        self._num_logprob_tensors = 0 if result is None or result.logprobs is None else 3
        self._has_prompt_scores = self._has_prompt_scores or prompt_scores is not None
        tensors = [] if result is None else [result.sampled_token_ids]
        if self._num_logprob_tensors:
            tensors += [result.logprob_token_ids, result.logprobs, result.sampled_token_ranks]
        if prompt_scores is not None:
            tensors += prompt_scores.tensors()
        if not tensors:
            return
        if tensors[0].device.type == "cuda":
            self._tensors = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._tensors = tensors

    def resolve(self) -> RunnerOutput:
        """The step's sampled tokens (and logprobs) on the host, in the order of its sampled sequences (read
        once; later calls return the same object)."""
        if self._resolved is not None:
            return self._resolved
        if self._event is not None:
            self._event.synchronize()
        tensors = self._tensors
        out = RunnerOutput(tensors[0].tolist() if self.num_samples else [])
        if self._num_logprob_tensors:
            out.logprob_token_ids = tensors[1].tolist()
            out.logprobs = tensors[2].tolist()
            out.sampled_token_ranks = tensors[3].tolist()
        if self._has_prompt_scores:
            token_ids, logprobs, ranks = tensors[-3:]
            out.prompt_logprobs = PromptLogprobs(token_ids.tolist(), logprobs.tolist(), ranks.tolist())
        out.pooled = self._pooled_on_host()
        self._resolved = out
        return out

    def _pooled_on_host(self) -> list[torch.Tensor | None] | None:
        if self.pooled is None:
            return None
        return [None if p is None else p.cpu() for p in self.pooled]


class PipelinedStep(InFlightStep):
    """A step launched into a pipeline: its logits are still on their way from the last stage (``receive``, the
    pending receive into ``logits``); ``resolve`` waits for them and samples."""

    def __init__(self, num_samples: int, receive, logits: torch.Tensor, sample) -> None:
        super().__init__(num_samples)
        self._receive, self._logits, self._sample = receive, logits, sample

    def resolve(self) -> RunnerOutput:
        if self._receive is not None:
            self._receive.wait()
            with torch.inference_mode():
                self._hold(self._sample(self._logits))
            self._receive = self._logits = self._sample = None
        return super().resolve()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build parameters directly in ``dtype`` (no float32 copy of a 7B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner(Runner):
    """Builds the model on its device and executes scheduled steps.

    ``enforce_eager`` turns CUDA graphs off; ``max_decode_rows`` (default ``max_num_seqs``; with speculative
    decoding, the rows of ``max_num_seqs`` requests and their drafts) bounds the largest decode graph bucket. ``tp_group``
    (set by the tensor-parallel runner) makes this runner one rank of a group, holding its shards only;
    ``pp_group`` makes it one rank of a pipeline stage, holding that stage's layers only (``model_executor.pipeline``;
    the hidden states and residual travel between stages point to point, and the last stage's logits go to the
    driver, which samples; decode runs eagerly, without CUDA graphs). The KV
    cache holds one block more than the scheduler is given: the spare block that padded decode rows use.
    ``kernels`` chooses the kernels (None: ``KernelConfig.from_env()``); they are put in place once, by
    ``finalize_weights``.
    """

    def __init__(
        self,
        hf_config: dict,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        attention_backend: str | None = None,
        enforce_eager: bool = False,
        max_num_seqs: int = 256,
        tp_group: TensorParallelGroup | None = None,
        kernels: KernelConfig | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        pp_group: PipelineGroup | None = None,
        max_decode_rows: int | None = None,
    ) -> None:
        self.device = device
        self.kernels = kernels or KernelConfig.from_env()
        self.dtype = dtype
        if device.type == "cpu":
            keep_freed_memory_mapped()
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.max_decode_rows = max_decode_rows or max_num_seqs
        model_cls = get_model_class(hf_config)
        self._model_cls = model_cls
        self.model_config = model_cls.config_from_hf(hf_config)
        if attention_backend is None:
            self.backend = default_attention_backend(device, self.kernels)
        else:
            self.backend = get_attention_backend(attention_backend, device, self.kernels)
        self.tp = tp_group or TensorParallelGroup()  # one rank unless this runner is part of a TP group
        self.pp = pp_group or PipelineGroup()  # one stage unless this runner is part of a pipeline
        self._sends: collections.deque = collections.deque()  # activations on their way to the next stage
        if self.pp.num_stages > 1:
            self.enforce_eager = True  # captured decode graphs would hold the whole model's forward
        # The weights' format: the checkpoint's quantization_config, or --quantization (None: full precision).
        self.quant_config = resolve_quant_config(hf_config, quantization)
        parallel = self.tp.world_size > 1 or self.pp.num_stages > 1
        if self.quant_config is not None and self.quant_config.name == "gguf" and parallel:
            # GGUF blocks are not sharded: the file is de-quantized at load, as before GGUF was kept quantized
            logger.warning("GGUF with tensor_parallel_size %d x pipeline_parallel_size %d: the weights are "
                           "de-quantized at load (GGUF stays quantized on one rank)", self.tp.world_size,
                           self.pp.num_stages)
            self.quant_config = None
        if self.quant_config is not None:
            self.quant_config.check_supported(device, dtype)
        self.kv_cache_dtype = kv_cache_dtype
        # The KV cache's element type: the model dtype, or float8 e4m3 with per-head scales (quantization.kv_cache).
        self.kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype)
        self.fp8_kv_cache = self.kv_dtype == FP8_KV_DTYPE
        if self.fp8_kv_cache and self.pp.num_stages > 1:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype} with pipeline_parallel_size {self.pp.num_stages} is "
                             "not supported yet")
        if self.tp.peer is not None:  # every rank holds the same switches, so all take the same path
            if self.kernels.peer_all_reduce:
                self.tp.peer.use_kernels(self.kernels, device)
            else:
                self.tp.peer = None  # every all-reduce through NCCL
        if self.tp.world_size > 1 or self.pp.num_stages > 1:
            # Build on meta, keep only this rank's shards of its stage's layers, then give them storage: no rank
            # holds the whole model.
            with torch.device("meta"), _default_dtype(dtype):
                self.model = model_cls(self.model_config, self.backend, max_position=max_model_len)
            if self.tp.world_size > 1:
                shard_model(self.model, self.tp, device, dtype)
            if self.pp.num_stages > 1:
                ranges = stage_layer_ranges(self.model_config.num_layers, self.pp.num_stages)
                start, end = ranges[self.pp.stage]
                keep_stage(self.model, PipelineStage(self.pp.stage, self.pp.num_stages, start, end))
            materialize(self.model, device)
        else:
            with torch.device(device), _default_dtype(dtype):
                self.model: CausalLM = model_cls(self.model_config, self.backend, max_position=max_model_len)
        self.rope_switch = model_rope_switch(self.model)
        if self.fp8_kv_cache:  # unit scales until the checkpoint's load (the layers then ask for FP8_KV_CACHE)
            install_kv_scales(self.model, device)
        # A default backend lacking a feature the layers need (a window, soft-capping, sinks) gives way to PyTorch's.
        self.backend = backend_for_model(self.model, self.backend, chosen_by_user=attention_backend is not None)
        # a vision-language model: steps look for image tokens (``_image_rows``); a text model's never do
        self.takes_images = bool(getattr(self.model, "accepts_images", False))
        # a model whose forward starts from given embeddings (``input_embeds``) can take prompts given as embeddings;
        # steps look for them once the engine takes them (``embeds_prompts``: ``take_prompt_embeds``)
        self.takes_prompt_embeds = bool(getattr(self.model, "accepts_prompt_embeds", False))
        self.embeds_prompts = False
        # Qwen2-VL's M-RoPE: the vision tower's merge size, which the positions of its image tokens follow (None: a
        # model without M-RoPE, whose steps never look at them)
        self.mrope_merge: int | None = getattr(self.model, "mrope_merge_size", None)
        # Gemma 3: each image's tokens attend to each other (the attention metadata lists the step's image blocks)
        self.image_blocks = bool(getattr(self.model, "bidirectional_images", False))
        if self.takes_images and self.pp.num_stages > 1:
            raise ValueError(f"{model_cls.__name__}: vision-language models run without pipeline parallelism for "
                             "now (pipeline_parallel_size 1)")
        self.model.cast(dtype)
        share_rotary_tables(self.model)  # one cos/sin table pair, not one per layer
        if self.quant_config is not None:
            count = quantize_linears(self.model, self.quant_config, dtype, device)
            logger.info("quantization %s: %d linear layers", self.quant_config.describe(), count)
            if device.type == "cuda" and not self.enforce_eager and quantized_experts(self.model):
                # their kernel loops over the routed experts, reading the routing on the host: not capturable
                logger.warning("mixture-of-experts experts kept quantized (%s) run one block matmul per expert; "
                               "CUDA graphs are off (decode runs eagerly)", self.quant_config.name)
                self.enforce_eager = True
        # Key/value heads this rank holds (all of them without tensor parallelism).
        self.num_kv_heads = self.model.num_kv_heads
        # What each layer keeps in the KV cache (layers may differ: latent attention keeps a compressed latent).
        self.kv_cache_specs = self.model.kv_cache_specs()
        if self.fp8_kv_cache:
            check_fp8_kv_cache_supported(device, self.kv_cache_specs, model_cls.__name__)
        self.model.eval()
        self.sampler = Sampler(argmax=argmax_rows_for(device, self.kernels))
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.spare_block = 0
        self._inputs = InputStager(device)
        self._pending_inputs = InputStager(device, initial=1024)  # row/sample indices of pending input tokens
        # A vision-language model's recently encoded images: digest -> features (``_image_rows``).
        self._image_features: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        # Decode batches are padded to these sizes (set on CUDA when graphs are captured; tests set it on CPU).
        self.decode_buckets: list[int] = []
        self.graphs: DecodeGraphs | None = None
        self.use_cuda_graphs = False
        # Tensor parallelism: the driver hands every packed step to this callback (which sends it to the workers)
        # before running its own shard.
        self.step_listener = None
        # LoRA adapter slots (``inferneo.lora.slots``), once ``enable_lora`` has wrapped the projections.
        self.lora = None
        # Sleep mode: the sleep level (0: awake), the weights set aside, and the load keys of weights that a
        # level-2 sleep dropped and no update has written since (the engine refuses requests while any are left).
        self.sleep_level = 0
        self._parked: ParkedWeights | None = None
        self.missing_weights: set[str] = set()
        self._twin: CausalLM | None = None

    # ---- weights and cache -------------------------------------------------------------------------------

    def load_weights(self, weights) -> None:
        """Copy checkpoint weights (Hugging Face names) into the model."""
        start = time.perf_counter()
        if self.pp.num_stages > 1:  # this stage's layers (a format reads their checkpoint names)
            weights = stage_weights(self.model, weights, renumber=self.quant_config is None)
        if self.quant_config is not None:
            weights = self.quant_config.prepare_weights(weights)
            if self.pp.num_stages > 1:
                weights = renumber_stage_weights(self.model, weights)  # numbered from 0, as the stage holds them
        kv_scales = CheckpointKVScales()
        weights = kv_scales.split(weights)  # KV cache scales go to the attention layers, not to load_weights
        self.model.load_weights(weights)
        kv_scales.apply(self.model, self.fp8_kv_cache)
        logger.info("loaded weights in %.1f s", time.perf_counter() - start)

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights from the config alone (for benchmarks of real architectures), drawn on the device."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for layer in quantized_linears(self.model):
            layer.method.init_dummy(layer, gen)
        for experts in quantized_experts(self.model):
            experts.init_dummy(gen)
        for name, param in self.model.named_parameters():
            if is_quantized_parameter(param):
                continue
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-0.02, 0.02, generator=gen)

    def finalize_weights(self) -> None:
        """Put the device's kernels in place once the weights are final (``device_kernels.use_device_kernels``):
        native CPU kernels and packed linears on CPU, Triton kernels and the GEMV on CUDA, the fused all-reduce +
        norm with tensor parallelism over peer memory, as ``self.kernels`` allows. Call once.

        Then the memory that building, loading and packing freed goes back to the OS (the host heap; on CUDA also
        the caching allocator's free blocks), so that the weights are held once: see ``docs/quantization.md``,
        "Memory"."""
        finalize_quantized_linears(self.model, self.kernels)
        use_device_kernels(self.model, self.device, self.kernels, self.tp, max_num_seqs=self.max_num_seqs)
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- weight updates and sleep mode ---------------------------------------------------------------------

    def weights_update_refusal(self) -> str | None:
        """Why this runner's weights cannot take new values in place; None when they can."""
        if self.quant_config is not None:
            return (f"the weights are quantized ({self.quant_config.name}) and repacked at load: they cannot take new "
                    "values in place; serve the model unquantized to update its weights")
        if self.lora is not None:
            return "weight updates with LoRA adapters enabled are not supported yet"
        if self.pp.num_stages > 1:
            return "weight updates with pipeline parallelism are not supported yet"
        if self.takes_images:
            return "weight updates of vision-language models are not supported yet"
        return None

    def _load_twin(self) -> CausalLM:
        """The model built again on the meta device, unpacked: weights are checked against it (names, shapes)
        before any is written, so a refused update changes nothing."""
        if self._twin is None:
            with torch.device("meta"), _default_dtype(self.dtype):
                self._twin = self._model_cls(self.model_config, self.backend, max_position=self.max_model_len)
        return self._twin

    def check_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        """The load keys ``weights`` would write; ValueError (nothing written) for a name the model does not have,
        a wrong shape (of the whole checkpoint tensor, on every rank), or weights that cannot be updated."""
        refusal = self.weights_update_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        if self.sleep_level:
            raise ValueError("the engine is sleeping: wake it up before updating its weights")
        return self._load_twin().load_weights(weights, strict=False)

    @torch.no_grad()
    def update_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Copy new values (Hugging Face names, any part of the checkpoint) into the loaded model, where its fast
        paths read them (packed CPU linears are packed again; a tensor-parallel rank takes its slices). ValueError,
        with nothing changed, as ``check_weights`` says."""
        keys = self.check_weights(weights)
        with plain_weights(self.model, {key.partition("#")[0] for key in keys}):
            self.model.load_weights(weights, strict=False)
        self.missing_weights -= keys
        logger.info("updated %d weight tensors", len(weights))

    def sleep(self, level: int) -> None:
        """Free the KV cache (its contents are lost); on CUDA also move the weights to pinned host memory
        (level 1), or drop the weights (level 2: ``wake_up`` brings zeros back, to be loaded with
        ``update_weights``). On CPU, level 1 keeps the weights where they are."""
        self.check_sleep(level)
        if self.device.type == "cuda":
            self.release_cuda_graphs()
        self.kv_caches = []
        if level == 2:
            self._parked = park_weights(self.model, keep=False)
            self.missing_weights = self._load_twin().expected_load_keys()
        elif self.device.type == "cuda":
            self._parked = park_weights(self.model, keep=True)
        self.sleep_level = level
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("sleeping (level %d): KV cache freed%s", level,
                    "" if self._parked is None else f", {self._parked.nbytes / 2**20:.0f} MiB of weights "
                    f"{'moved to host memory' if self._parked.kept else 'dropped'}")

    def check_sleep(self, level: int) -> None:
        """ValueError if the runner cannot go to sleep at ``level`` now (nothing changes)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.sleep_level:
            raise ValueError(f"the engine is already sleeping (level {self.sleep_level})")
        if self.pp.num_stages > 1:
            raise ValueError("sleep mode with pipeline parallelism is not supported yet")
        if level == 2 and (refusal := self.weights_update_refusal()) is not None:
            raise ValueError(f"sleep level 2 drops the weights, which could not be loaded again: {refusal}")

    def wake_up(self) -> None:
        """Undo ``sleep``: the weights back on the device (zeros after level 2) and a new, empty KV cache."""
        if not self.sleep_level:
            return
        if self._parked is not None:
            self._parked.restore(self.device)
            self._parked = None
        self.sleep_level = 0
        self.allocate_kv_cache(self.num_blocks)

    def enable_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int, max_num_batched_tokens: int):
        """Wrap the model's projections with ``max_loras`` LoRA slots (``inferneo.lora``); after
        ``finalize_weights``, before the KV cache (and its CUDA graphs). Returns the slots."""
        from inferneo.lora.slots import LoRASlots

        if self.pp.num_stages > 1:
            raise ValueError("enable_lora with pipeline_parallel_size > 1 is not supported yet")
        self.lora = LoRASlots(self.model, self.model_config, max_loras, max_lora_rank, max_cpu_loras, self.dtype,
                              self.device, max(max_num_batched_tokens, self.max_decode_rows),
                              self.tp.all_reduce if self.tp.world_size > 1 else None)
        logger.info("LoRA: %s", self.lora.describe())
        return self.lora

    def take_prompt_embeds(self) -> None:
        if not self.takes_prompt_embeds:
            raise ValueError(f"{type(self.model).__name__} does not take prompt embeddings")
        self.embeds_prompts = True

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of KV cache one block takes over all layers (each layer as its ``KVCacheSpec`` says)."""
        return kv_bytes_per_block(self.kv_cache_specs, self.block_size, self.kv_dtype)

    def profile_kv_memory(self, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
        """Bytes the KV cache may take on CUDA, measured with a worst-case forward pass (see ``memory``).

        Call after the weights are loaded and before ``allocate_kv_cache``.
        """
        profile = profile_peak_memory(self, max_num_batched_tokens, self.max_num_seqs)
        budget = kv_cache_budget(profile, gpu_memory_utilization, reserve=self.kv_bytes_per_block)
        logger.info("GPU memory: %.2f GiB total, %.2f GiB in use, %.2f GiB activation peak -> %.2f GiB for KV",
                    profile.total / 2**30, profile.in_use / 2**30, profile.peak_activation / 2**30,
                    budget / 2**30)
        return budget

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks for the scheduler plus the spare padding block; capture CUDA graphs."""
        self.spare_block = num_blocks
        self.kv_caches = allocate_kv_caches(self.kv_cache_specs, num_blocks + 1, self.block_size, self.kv_dtype,
                                            self.device)
        self.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens in %s (kv_cache_dtype %s), %d bytes a block", num_blocks,
                    self.block_size, str(self.kv_dtype).removeprefix("torch."), self.kv_cache_dtype,
                    self.kv_bytes_per_block)
        if self.device.type == "cuda" and not self.enforce_eager:
            self.capture_cuda_graphs()

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs for every bucket up to ``max_decode_rows`` (at most 256)."""
        self.decode_buckets = decode_buckets(self.max_decode_rows)
        if self.lora is not None:
            self.lora.begin_capture()
        self.graphs = DecodeGraphs(
            self.model, self.backend, self.kv_caches, self.decode_buckets, self.block_size,
            self.max_blocks_per_seq, self.model_config.hidden_size, self.dtype, self.device, self.spare_block,
        )
        self.graphs.capture()
        self.use_cuda_graphs = True

    def release_cuda_graphs(self) -> None:
        """Destroy the captured decode graphs (later decode steps run eagerly); see ``DecodeGraphs.release``."""
        if self.graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs.release()
            self.graphs = None
        self.use_cuda_graphs = False

    # ---- one step ----------------------------------------------------------------------------------------

    def execute(self, step: StepRecord) -> RunnerOutput:
        """Run one scheduled step and sample the next token of every sequence the step samples."""
        return self.launch(step).resolve()

    @torch.inference_mode()
    def launch(self, step: StepRecord, previous: InFlightStep | None = None) -> InFlightStep:
        """Queue one step on the device and return without waiting for it (on CPU the work is done on return).

        Decode rows whose input token ``previous`` (the step launched before) is still sampling read it from
        ``previous``'s device output (asynchronous scheduling; see ``ScheduledSequence.pending_sample``).
        """
        items = step.sequences  # decodes first
        # rows given as embeddings (images' features, a prompt's embeddings) need an eager pass: a captured graph
        # reads token ids only
        embedded = self.takes_images or (self.embeds_prompts and any(it.prompt_embeds is not None for it in items))
        bucket = None if embedded and self._has_embedded_rows(items) else self._decode_bucket(items)
        graphs = self.graphs if bucket is not None and self.use_cuda_graphs else None
        layout = graphs.layout if graphs is not None else step_layout(items, self.block_size, pad_rows=bucket)
        host, host_tensor = self._inputs.host(layout.size)
        packed = pack_step(host, layout, items, self.block_size, bucket, self.spare_block, self.rope_switch)
        mrope = apply_mrope_positions(host, packed, items, self.mrope_merge) if self.mrope_merge else None
        num_samples = packed.num_samples
        lora_step = None
        if self.lora is not None:
            decode_items = items[: packed.num_decode_sequences]
            row_loras = [it.lora for it in decode_items for _ in range(it.decode_rows)]
            lora_step = LoRAStep(row_loras + [it.lora for it in items[len(decode_items):]], packed.num_real_decode,
                                 [s.num_tokens for s in packed.spans], packed.num_tokens, graphs is not None)
            self.lora.prepare(lora_step)
        prompt_rows, prompt_targets, num_top = _prompt_rows(items, packed)
        # rows whose embeddings are given (image features, prompt embeddings): the driver computes them (its vision
        # tower encodes the images) and, with tensor parallelism, hands them to every rank
        embedded_rows, image_blocks = self._embedded_rows(items, packed) if embedded else (None, [])
        if self.step_listener is not None:
            num_previous = previous.num_samples if previous is not None and packed.pending_rows else 0
            self.step_listener(RemoteStep(host[: layout.size].copy(), packed, bucket, num_samples, num_previous,
                                          prompt_rows, lora_step, mrope,
                                          [(row, len(rows)) for row, rows in embedded_rows or ()], image_blocks))
            if num_previous:  # the workers read the tokens still in flight too: send them device to device
                self.tp.broadcast(previous.sampled)
            if embedded_rows:
                self.tp.broadcast(torch.cat([rows.to(self.dtype) for _, rows in embedded_rows]).contiguous())
        receive = None
        if num_samples and self.pp.num_stages > 1:  # the last stage's logits, received while later steps launch
            incoming = torch.empty(num_samples, self.model_config.vocab_size, dtype=torch.float32,
                                   device=self.device)
            receive = self.pp.irecv(incoming, self.pp.last_stage_driver)
        hidden, dev = self._forward(packed, host_tensor, bucket, graphs, previous.sampled if previous else None,
                                    self._token_types(items, packed), embedded_rows,
                                    None if mrope is None else self._upload(mrope), image_blocks)
        pooling_rows = pooling_rows_of(items, packed)
        pooled = pool_step(hidden, pooling_rows) if pooling_rows else None
        if pooled is not None and (head := getattr(self.model, "classify", None)) is not None:
            pooled = apply_head(head, pooled)  # a cross-encoder: the pooled first tokens become logits
        prompt_scores = None
        if prompt_rows is not None:
            if self.pp.num_stages > 1:  # the hidden states here are the first stage's, not the model's output
                raise ValueError("prompt log-probabilities are not supported with pipeline parallelism")
            prompt_scores = score_prompt_rows(self.model.compute_logits, hidden, self._upload(prompt_rows),
                                              self._upload(prompt_targets), num_top)
        if not num_samples:
            in_flight = InFlightStep(0, None, prompt_scores)
        else:
            bitmask = step.bitmask() if step.bitmask is not None else None  # host work while the device computes
            sampling = SamplingMetadata.build(step.sampling_rows, self.model_config.vocab_size, self.device,
                                              bitmask)
            if receive is not None:
                in_flight = PipelinedStep(num_samples, receive, incoming,
                                          lambda logits: self.sampler(logits, sampling))
            else:
                logits = self._logits(hidden, dev, packed, num_samples)
                in_flight = InFlightStep(num_samples, self.sampler(logits, sampling), prompt_scores)
        in_flight.pooled = pooled
        return in_flight

    @torch.inference_mode()
    def execute_remote(self, step: RemoteStep) -> None:
        """A tensor-parallel worker's side of a step: the driver's packed inputs through this rank's shards."""
        graphs = self.graphs if step.bucket is not None and self.use_cuda_graphs else None
        host, host_tensor = self._inputs.host(step.packed.layout.size)
        host[: step.packed.layout.size] = step.host
        if step.lora is not None:
            self.lora.prepare(step.lora)
        previous_samples = None
        if step.num_previous_samples and self.pp.is_first:  # the driver's previous samples, which this step reads
            previous_samples = self.tp.broadcast(
                torch.empty(step.num_previous_samples, dtype=torch.int64, device=self.device))
        embedded_rows = None
        if step.embedded:  # the driver's image features / prompt embeddings, for the rows it names
            given = self.tp.broadcast(torch.empty(sum(count for _, count in step.embedded),
                                                  self.model_config.hidden_size, dtype=self.dtype,
                                                  device=self.device))
            embedded_rows = [(row, part) for (row, _), part in
                             zip(step.embedded, given.split([count for _, count in step.embedded]), strict=True)]
        hidden, dev = self._forward(step.packed, host_tensor, step.bucket, graphs, previous_samples,
                                    embedded_rows=embedded_rows,
                                    mrope_positions=None if step.mrope is None else self._upload(step.mrope),
                                    image_blocks=step.image_blocks)
        if step.prompt_rows is not None:  # the driver's chunks through this rank's shard of the LM head
            score_prompt_rows(self.model.compute_logits, hidden, self._upload(step.prompt_rows), None, 0)
        if step.num_samples:
            self._logits(hidden, dev, step.packed, step.num_samples)

    def _logits(self, hidden: torch.Tensor, dev: torch.Tensor, packed: PackedStep, count: int) -> torch.Tensor | None:
        """The sampled rows' logits on the driver (None elsewhere). In a pipeline, the last stage computes them
        and its tensor-parallel rank 0 sends them to the driver (global rank 0)."""
        if self.pp.num_stages == 1:
            return self.model.compute_logits(self._sample_rows(hidden, dev, packed, count))
        if self.pp.is_last:
            logits = self.model.compute_logits(self._sample_rows(hidden, dev, packed, count))
            if logits is not None:  # tensor-parallel rank 0 of the last stage
                self.pp.send(logits, dst=0)
            return None
        return None  # the driver receives the logits itself (``launch``); other ranks of earlier stages: none

    def _token_types(self, items: list[ScheduledSequence], packed: PackedStep) -> torch.Tensor | None:
        """The step's token type ids (1 from each encoder input's ``token_type_start`` on, else 0) on the device;
        None when no input has a second segment (the model is then called as ever), and always for a decoder: it
        has no token types (a decoder classifier scoring a pair whose tokenizer marks the second text, as Llama
        3's does, reads it as Hugging Face's decoder classifiers do, without them)."""
        if not getattr(self.model, "is_encoder", False) or not any(it.token_type_start is not None for it in items):
            return None
        types = torch.zeros(packed.num_tokens, dtype=torch.int64)
        for index, it in enumerate(items):
            if it.token_type_start is not None:
                row = packed.first_row(index)
                skip = max(it.token_type_start - it.num_computed_tokens, 0)
                types[row + skip : row + it.num_new_tokens] = 1
        return types.to(self.device, non_blocking=True)

    def _has_embedded_rows(self, items: list[ScheduledSequence]) -> bool:
        """Whether a sequence of the step runs positions given as embeddings (an image's tokens, a prompt's
        embeddings) this step."""
        for it in items:
            if it.embeds_rows is not None:
                return True
            if it.images:
                start, stop = it.num_computed_tokens, it.num_computed_tokens + it.num_new_tokens
                if any(image.offset < stop and image.end > start for image in it.images):
                    return True
        return False

    def _embedded_rows(self, items: list[ScheduledSequence], packed: PackedStep
                       ) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, int]]]:
        """``(first row, embeddings)`` for each run of the step's rows whose embeddings are given: a prompt's
        embeddings (the chunk's slice of them, in the model's hidden space: ``prompt_embeds_to_hidden``) and a
        vision-language model's image features (``_image_rows``); and ``(first row, count)`` of each image's rows
        (Gemma 3's image blocks)."""
        rows: list[tuple[int, torch.Tensor]] = []
        for index, it in enumerate(items):
            span = it.embeds_rows
            if span is None:
                continue
            start, stop = span
            embeds = it.prompt_embeds.rows(start, stop).to(self.device, non_blocking=True)
            rows.append((packed.first_row(index), self.model.prompt_embeds_to_hidden(embeds.to(self.dtype))))
        images = self._image_rows(items, packed) if self.takes_images else []
        return rows + images, [(row, len(features)) for row, features in images]

    def _image_rows(self, items: list[ScheduledSequence], packed: PackedStep) -> list[tuple[int, torch.Tensor]]:
        """The step's image features: ``(first row, features)`` for each image with tokens among the step's (the
        features of those tokens only, when a prompt chunk holds part of an image). Each image is encoded once
        while its features are among the last :data:`IMAGE_FEATURE_CACHE` images' (keyed by digest)."""
        rows: list[tuple[int, torch.Tensor]] = []
        for index, it in enumerate(items):
            if not it.images:
                continue
            start, stop = it.num_computed_tokens, it.num_computed_tokens + it.num_new_tokens
            for image in it.images:
                lo, hi = max(image.offset, start), min(image.end, stop)
                if lo >= hi:
                    continue
                features = self._image_features.pop(image.digest, None)
                if features is None:
                    features = self.model.encode_image(image.tensor(), image.grid)
                self._image_features[image.digest] = features  # now the most recently used
                while len(self._image_features) > IMAGE_FEATURE_CACHE:
                    self._image_features.popitem(last=False)
                rows.append((packed.first_row(index) + lo - start, features[lo - image.offset : hi - image.offset]))
        return rows

    def _forward(self, packed: PackedStep, host_tensor: torch.Tensor, bucket: int | None,
                 graphs: DecodeGraphs | None, previous_samples: torch.Tensor | None = None,
                 token_types: torch.Tensor | None = None,
                 embedded_rows: list[tuple[int, torch.Tensor]] | None = None,
                 mrope_positions: torch.Tensor | None = None,
                 image_blocks: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's hidden states for the packed step, and the step's device tensor. ``mrope_positions``: the
        ``[3, num_tokens]`` positions of a step with Qwen2-VL image tokens, in place of the packed ones;
        ``image_blocks``: each image's rows, ``(first row, count)``, which a Gemma 3 lets see each other."""
        layout = packed.layout
        if graphs is not None:
            dev = self._inputs.upload(host_tensor, layout.used(packed.num_decode), graphs.inputs)
            self._fill_pending_ids(packed, graphs.inputs, previous_samples)
            return graphs.replay(bucket), dev
        dev = self._inputs.upload(host_tensor, layout.size)
        if self.pp.is_first:  # later stages read hidden states, not ids
            self._fill_pending_ids(packed, dev, previous_samples)
        input_ids, positions, metadata = step_views(dev, packed, self.block_size)
        if mrope_positions is not None:
            positions = mrope_positions
        self.backend.prepare(metadata)
        if token_types is not None:  # an encoder's inputs with a second segment (a BERT cross-encoder's pairs)
            return self.model(input_ids, positions, self.kv_caches, metadata, token_type_ids=token_types), dev
        if embedded_rows:  # image tokens, prompt embeddings: the given rows in place of the tokens' embeddings
            embeds = self.model.embed(input_ids)
            for row, features in embedded_rows:
                embeds[row : row + features.shape[0]] = features
            if self.image_blocks and image_blocks:  # Gemma 3: each image's rows in the step see each other (the
                metadata.image_blocks = image_blocks  # scheduler never ends a chunk inside an image)
            return self.model(input_ids, positions, self.kv_caches, metadata, input_embeds=embeds), dev
        if self.pp.num_stages == 1:
            return self.model(input_ids, positions, self.kv_caches, metadata), dev
        return self._stage_forward(input_ids, positions, metadata), dev

    def _stage_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata) -> torch.Tensor:
        """This pipeline stage's layers: the previous stage's hidden states and residual come in (one message),
        this stage's go out to the next; returns the hidden states (final only on the last stage)."""
        received = None
        if not self.pp.is_first:
            shape = (2, input_ids.shape[0], self.model_config.hidden_size)
            pair = self.pp.recv(shape, self.dtype, self.device, self.pp.prev_rank)
            received = (pair[0], pair[1])
        hidden, residual = stage_forward(self.model, input_ids, positions, self.kv_caches, metadata, received)
        if not self.pp.is_last:
            # Sent without waiting: the next stage may still be busy with an earlier step (several are in flight).
            outgoing = torch.stack((hidden, residual))
            self._sends.append((self.pp.isend(outgoing, self.pp.next_rank), outgoing))
            while len(self._sends) > 8 or (self._sends and self._sends[0][0].is_completed()):
                self._sends.popleft()[0].wait()
        return hidden

    def _fill_pending_ids(self, packed: PackedStep, inputs: torch.Tensor,
                          previous_samples: torch.Tensor | None) -> None:
        """Copy the input tokens still being sampled by the previous step (``previous_samples``, on the device)
        into the uploaded ids."""
        count = len(packed.pending_rows)
        if not count:
            return
        if previous_samples is None:
            raise RuntimeError("a step reads tokens of a previous step that was not given")
        host, host_tensor = self._pending_inputs.host(2 * count)
        host[:count] = packed.pending_rows
        host[:count] += packed.layout.ids
        host[count : 2 * count] = packed.pending_samples
        index = self._pending_inputs.upload(host_tensor, 2 * count)
        inputs[index[:count]] = previous_samples[index[count : 2 * count]]

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device, non_blocking=True)

    @staticmethod
    def _sample_rows(hidden: torch.Tensor, dev: torch.Tensor, packed: PackedStep, count: int) -> torch.Tensor:
        if packed.samples_are_prefix:
            return hidden[:count]
        start = packed.layout.sample_rows
        return hidden[dev[start : start + count]]

    def _decode_bucket(self, items: list[ScheduledSequence]) -> int | None:
        """The padded row count of a decode-only step (drafts included) that fits a bucket, else None (run it as
        it is)."""
        if not self.decode_buckets or (self.graphs is not None and not self.use_cuda_graphs):
            return None
        num_seqs, rows = decode_extent(items)
        return pick_bucket(self.decode_buckets, rows) if num_seqs == len(items) else None


def _prompt_rows(items: list[ScheduledSequence], packed: PackedStep
                 ) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """The flat hidden rows to score for prompt log-probabilities, the prompt tokens they score, and the step's
    largest top-k; (None, None, 0) when no sequence of the step asked."""
    if not any(it.prompt_logprobs is not None for it in items):
        return None, None, 0
    spans = []
    for index, it in enumerate(items):
        if it.prompt_logprobs is None:
            continue
        spans.append((packed.first_row(index), it.num_computed_tokens, it.token_ids, it.prompt_logprobs))
    rows, targets = gather_prompt_rows(spans)
    return rows, targets, max(span.num_top for *_, span in spans)
