"""The request record that the scheduler, the KV cache manager and the model runner share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from inferneo.engine.prompt_embeds import PromptEmbeds
from inferneo.engine.prompt_logprobs import PromptLogprobsCollector
from inferneo.engine.protocol import CoreRequest, LoraRef, PoolingRequest
from inferneo.multimodal.inputs import ImageInput
from inferneo.sampling.metadata import SamplingRow
from inferneo.sampling_params import SamplingParams
from inferneo.spec_decode.state import SpeculationState
from inferneo.structured_output.compiler import SequenceMatcher


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # ended by the engine: a structured-output constraint reached a dead end

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated: token ids in, token ids out.

    ``all_token_ids`` is the prompt followed by the generated tokens; ``num_computed_tokens`` of them already
    have their keys and values in the KV cache. Preemption by recompute resets that count to zero.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first scheduling; -1 until then
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # With asynchronous scheduling: this request's row among the samples of the step still running on the
    # device, whose token is not on the host yet (-1: none). The next step reads that token on the device.
    pending_sample: int = -1
    # Structured output: the matcher that limits this sequence's next token (set once its grammar is compiled).
    grammar: SequenceMatcher | None = None
    # An embedding request: what it asked for, how the model pools (set by the core) and its pooled state so far.
    pooling: PoolingRequest | None = None
    pooling_method: str | None = None
    pooled: torch.Tensor | None = None
    # The LoRA adapter the request runs with (None: the base model); keys its prefix-cache blocks too.
    lora: LoraRef | None = None
    # vLLM's cache_salt: its prefix-cache blocks serve (and are served by) only requests with the same salt.
    cache_salt: str | None = None
    # A vision-language model's images (their tokens are in the prompt; their digests key the blocks holding them).
    images: list[ImageInput] | None = None
    # A prompt given as embeddings (its prompt token ids are placeholders; the digests of its rows key its blocks).
    prompt_embeds: PromptEmbeds | None = None
    # Scheduling steps in a row this waiting request was passed over for want of an adapter slot (the scheduler's
    # ``lora_max_wait_steps`` bounds them).
    lora_slot_waits: int = 0
    # Prompt log-probabilities collected over the prompt's chunks (None unless the request asked for them).
    prompt_logprobs: PromptLogprobsCollector | None = None
    # Speculative decoding: the request's tokens as the proposer reads them and its drafts' keep rate (made at the
    # first proposal).
    speculation: SpeculationState | None = None
    # LongRoPE past its original context (``LongRopeSwitch``): every token of this sequence rotates by the long
    # factors, because its prompt was longer than the original context or the sequence has grown past it (and was
    # computed again, as Hugging Face's generation does then).
    long_rope: bool = False
    # What the sampler reads of this sequence (shares the token lists above; built once).
    sampling_row: SamplingRow = field(init=False, repr=False)

    @classmethod
    def from_core_request(cls, spec: CoreRequest) -> Request:
        """The scheduler's record of a sequence the front end sent."""
        return cls(spec.request_id, list(spec.prompt_token_ids), spec.sampling_params, spec.max_tokens,
                   spec.eos_token_ids, spec.priority, spec.arrival_time, pooling=spec.pooling, lora=spec.lora,
                   cache_salt=spec.cache_salt, images=spec.images, prompt_embeds=spec.prompt_embeds)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.sampling_params.seed)
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = PromptLogprobsCollector(len(self.prompt_token_ids),
                                                           self.sampling_params.prompt_logprobs)
        # penalties read the prompt's tokens; a prompt given as embeddings has none (only placeholders)
        prompt = [] if self.prompt_embeds is not None else self.prompt_token_ids
        self.sampling_row = SamplingRow(self.sampling_params, prompt, self.output_token_ids,
                                        self.eos_token_ids, self.generator)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the scheduler counts: those on the host plus the one still being sampled, if any."""
        return len(self.all_token_ids) + (self.pending_sample >= 0)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def reaches_length_limit(self, max_model_len: int | None, extra: int = 0) -> bool:
        """Whether ``extra`` more tokens bring the request to its max_tokens or to the context limit."""
        return (self.num_output_tokens + extra >= self.max_tokens
                or (max_model_len is not None and self.num_tokens + extra >= max_model_len))

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether cached KV may stand in for this request's first tokens. Not for embedding requests whose
        pooling reads the hidden states of every position (mean) or of the first (cls): a cached position has
        KV but no hidden state. Last-token pooling computes the last position anyway, so it may."""
        return self.pooling_method is None or self.pooling_method == "last"

    def sort_key(self) -> tuple[int, float]:
        """Order for the priority policy: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)
