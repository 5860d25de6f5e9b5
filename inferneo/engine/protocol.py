"""The contract between the front end and the engine core: every record that crosses between them.

The front end (tokenizer, detokenizer, stop strings, request ids) sends :data:`CoreCommand` records to the core;
the core answers with :data:`CoreMessage` records. They are msgspec structs, so the same objects are handed
over directly when the core runs in a thread of this process and encoded with msgpack when it runs in a child
process (:func:`encode` / :data:`COMMAND_DECODER` / :data:`MESSAGE_DECODER`): a field added on one side is a
field on both, never a shifted position in a tuple.

Errors cross as data too: a :class:`RequestFailure` says which requests failed and whether it was the request's
fault (``INVALID``, a 400 for the server) or the engine's (``FAILED``, a 500); :class:`CoreDead` says the core
has stopped for good. :func:`RequestFailure.to_exception` and the exception classes here are what the front end
raises to its callers.
"""

from __future__ import annotations

import enum

import msgspec

from inferneo.engine.prompt_embeds import PromptEmbeds
from inferneo.multimodal.inputs import ImageInput
from inferneo.pooling.config import PoolingConfig
from inferneo.sampling_params import SamplingParams

# ---- front end -> core ----------------------------------------------------------------------------------------


class LoraRef(msgspec.Struct, array_like=True, frozen=True):
    """Which LoRA adapter a request runs with: the name users address it by, the id that keys its weights and its
    prefix-cache entries, and the folder it loads from (PEFT's layout)."""

    name: str
    lora_id: int
    path: str


class PoolingRequest(msgspec.Struct, array_like=True, frozen=True):
    """An embedding request: run the prompt through the model once (prefill only, no KV kept afterwards) and
    return its pooled hidden state instead of generating. ``dimensions`` truncates the vector (Matryoshka models)
    before it is normalised; None keeps the model's width."""

    dimensions: int | None = None
    # "embed": the pooled vector; "score": a cross-encoder's logits for a (query, document) pair read as one input;
    # "classify": a sequence classifier's logits for one input
    task: str = "embed"
    # A pair's tokens from this position on are of token type 1 (BERT's second segment); None: all type 0.
    token_type_start: int | None = None


class CoreRequest(msgspec.Struct, array_like=True, frozen=True):
    """One sequence for the core to generate: token ids in, checked by the front end already."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # the sequence's own output limit (the front end resolved ``None`` to the context)
    eos_token_ids: frozenset[int]
    priority: int = 0
    arrival_time: float = 0.0
    lora: LoraRef | None = None  # run with this adapter (its KV never serves another adapter's prefix)
    pooling: PoolingRequest | None = None  # set: an embedding request (CoreOutput.embedding), not generation
    cache_salt: str | None = None  # its prefix-cache blocks serve only requests with the same salt
    # A vision-language model's images: each one's pixels and the prompt positions of its image tokens.
    images: list[ImageInput] | None = None
    # A prompt given as embeddings: ``prompt_token_ids`` are then placeholders, one per row, that the runner
    # replaces by these rows (``inferneo.engine.prompt_embeds``).
    prompt_embeds: PromptEmbeds | None = None


class AddRequests(msgspec.Struct, tag="add", array_like=True, frozen=True):
    """Sequences that enter the core together: all of them, or (if one cannot be built) none."""

    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, frozen=True):
    """Stop these sequences and free their KV blocks; unknown or finished ids are ignored."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True, frozen=True):
    """Abort everything and stop the core loop."""


class WeightTensor(msgspec.Struct, array_like=True, frozen=True):
    """One checkpoint tensor on its way to the core: its Hugging Face name, element type (``"float32"``,
    ``"bfloat16"``, ...), shape and raw bytes (C order). In a core of this process the bytes are a view of the
    sender's tensor (no copy); to a child process they travel once, msgpack-encoded."""

    name: str
    dtype: str
    shape: list[int]
    data: memoryview  # decoded from msgpack as a view of the message (no copy)


class ResetPrefixCache(msgspec.Struct, tag="reset_prefix_cache", array_like=True, frozen=True):
    """Drop every prefix-cache entry no running request holds (a ``ControlReply`` says whether none is left)."""

    call_id: int


class UpdateWeights(msgspec.Struct, tag="update_weights", array_like=True, frozen=True):
    """Load these tensors into the running model (all or none), then reset the prefix cache. Refused while a
    request is unfinished or the engine sleeps (``inferneo.engine.engine_control``)."""

    call_id: int
    tensors: list[WeightTensor]


class Sleep(msgspec.Struct, tag="sleep", array_like=True, frozen=True):
    """Free the KV cache (level 1; on CUDA the weights move to host memory) or the weights too (level 2)."""

    call_id: int
    level: int = 1


class WakeUp(msgspec.Struct, tag="wake_up", array_like=True, frozen=True):
    """Undo ``Sleep``: the KV cache back (empty), and the weights (level 1; level 2: zeros until loaded)."""

    call_id: int


ControlCommand = ResetPrefixCache | UpdateWeights | Sleep | WakeUp

CoreCommand = AddRequests | AbortRequests | Shutdown | ResetPrefixCache | UpdateWeights | Sleep | WakeUp

# ---- core -> front end ----------------------------------------------------------------------------------------


class PromptLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Log-probabilities of a prompt's tokens under the model, position by position.

    Row ``i`` belongs to prompt token ``i + 1`` (the first prompt token has no log-probability): the token itself
    first, then the ``k`` most likely ids at that position, with their log-probabilities, and the token's rank.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class CoreOutput(msgspec.Struct, array_like=True, gc=False):
    """What one step produced for one sequence: its new token(s), and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"; None while it runs
    stop_reason: int | str | None = None  # the stop token id that ended it
    # For each new token: the sampled id first, then the top-k ids, with their log-probabilities, and the
    # sampled token's rank. None unless the request asked for log-probabilities.
    logprob_token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None
    ranks: list[int] | None = None
    num_cached_tokens: int = 0
    # The prompt's log-probabilities, sent once (with the first output) when SamplingParams.prompt_logprobs is set.
    prompt_logprobs: PromptLogprobs | None = None
    # The pooled (and normalised) hidden state of an embedding request, sent with finish_reason "stop".
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FailureKind(enum.Enum):
    """Whose fault a failed request was."""

    INVALID = "invalid"  # the request breaks a rule of the engine (the caller's error: HTTP 400)
    FAILED = "failed"  # the engine failed while running it (HTTP 500); the engine goes on
    SLEEPING = "sleeping"  # the engine sleeps (``Sleep``) and takes no requests until it wakes up (HTTP 503)


class RequestFailure(msgspec.Struct, array_like=True, frozen=True):
    """Requests the core refused or lost in a failed step."""

    request_ids: list[str]
    kind: FailureKind
    message: str

    def to_exception(self) -> Exception:
        if self.kind is FailureKind.INVALID:
            return InvalidRequestError(self.message)
        if self.kind is FailureKind.SLEEPING:
            return EngineSleepingError(self.message)
        return RequestFailedError(self.message)


class EngineSnapshot(msgspec.Struct, frozen=True):
    """Engine counters as of the last step, for metrics and admission control."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    max_batch_size: int = 0
    batch_size_histogram: dict[int, int] = {}
    num_draft_tokens: int = 0  # speculative decoding: draft tokens verified
    num_accepted_tokens: int = 0  # and those kept


PROMPT_EMBEDS_OFF = ("prompt embeddings are not enabled: start the server with --enable-prompt-embeds "
                     "(offline: LLM(..., enable_prompt_embeds=True))")


class CoreInfo(msgspec.Struct, tag="ready", array_like=True, frozen=True):
    """What the front end needs to know about a loaded core (sent once, when the model is ready)."""

    model_name: str
    model_path: str
    architectures: list[str]
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    kv_bytes_per_block: int
    dtype: str
    device: str
    pid: int
    pooling: PoolingConfig = msgspec.field(default_factory=PoolingConfig)  # how embedding requests are pooled
    # False: a checkpoint without its language-model head (it serves embeddings, or classes and scores only)
    generates: bool = True
    scores_prompts: bool = True  # False: prompt log-probabilities are refused (pipeline parallelism)
    # True: the scheduler orders waiting requests by their priority (``scheduling_policy="priority"``); under FCFS a
    # request's priority would be ignored, so a non-zero one is refused
    schedules_by_priority: bool = False
    fingerprint: str = ""  # the loaded model's digest (``engine.fingerprint.core_fingerprint``)
    # the most log-probabilities a request may ask for per token (``EngineConfig.max_logprobs``; -1: the vocabulary)
    max_logprobs: int = 20
    hidden_size: int = 0  # the width of the model's embeddings (what a prompt_embeds row must have)
    # Why prompts given as embeddings are refused (``EngineConfig.enable_prompt_embeds`` off, or a model or layout
    # that cannot take them); None: they are taken.
    prompt_embeds_refusal: str | None = PROMPT_EMBEDS_OFF

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


class ControlReply(msgspec.Struct, array_like=True, frozen=True):
    """The core's answer to a control command (``call_id``): done (``ok``, with ``value``: for
    ``ResetPrefixCache`` whether the cache is empty now) or not (``message`` says why; ``busy``: refused because
    requests are unfinished or the engine sleeps, which waiting may cure; ``failed``: the engine failed while
    applying it; neither: the command itself was refused, as a bad name, shape or level)."""

    call_id: int
    ok: bool
    value: bool = False
    message: str = ""
    busy: bool = False
    sleeping: bool = False  # the engine's state after the command
    failed: bool = False

    def raise_if_refused(self) -> None:
        """Raise the front end's error for a refusal; nothing when it was done."""
        if self.ok:
            return
        if self.busy:
            raise EngineBusyError(self.message)
        if self.failed:
            raise RuntimeError(self.message)
        raise ValueError(self.message)


class StepOutputs(msgspec.Struct, tag="step", array_like=True):
    """One turn of the core loop: the outputs of a step, refused or failed requests, the counters, and the
    answers to control commands.

    ``num_taken`` counts the sequences the core has taken in since it started, so the front end knows how many
    it sent are still on their way (admission control counts them as waiting).
    """

    outputs: list[CoreOutput]
    failures: list[RequestFailure]
    num_taken: int
    snapshot: EngineSnapshot | None = None
    replies: list[ControlReply] = []  # answers to the control commands taken this turn


class CoreStartFailed(msgspec.Struct, tag="start_failed", array_like=True, frozen=True):
    """The core could not start (``invalid_config``: the configuration was at fault, not the machine)."""

    message: str
    invalid_config: bool


class CoreDead(msgspec.Struct, tag="dead", array_like=True, frozen=True):
    """The core has stopped after a fatal error and takes no more requests."""

    message: str


CoreMessage = CoreInfo | StepOutputs | CoreStartFailed | CoreDead

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
COMMAND_DECODER = msgspec.msgpack.Decoder(list[CoreCommand])
MESSAGE_DECODER = msgspec.msgpack.Decoder(CoreMessage)
_ONE_COMMAND_DECODER = msgspec.msgpack.Decoder(CoreCommand)


def decode_commands(data: bytes) -> list[CoreCommand | RequestFailure]:
    """The commands of one message. A request group whose values fail the engine's checks on arrival (a front-end
    fault: it checks them first) becomes a ``RequestFailure`` of its request ids, so that the core answers those
    requests and keeps serving the others; any other malformed message raises ``msgspec.ValidationError``."""
    try:
        return COMMAND_DECODER.decode(data)
    except msgspec.ValidationError:
        items = msgspec.msgpack.decode(data)
        if not isinstance(items, list):
            raise
    commands: list[CoreCommand | RequestFailure] = []
    for item in items:
        try:
            commands.append(_ONE_COMMAND_DECODER.decode(_encoder.encode(item)))
        except msgspec.ValidationError as exc:
            request_ids = _request_ids_of_add(item)
            if not request_ids:
                raise
            commands.append(RequestFailure(request_ids, FailureKind.INVALID,
                                           f"the engine could not take this request: {exc}"))
    return commands


def _request_ids_of_add(item: object) -> list[str]:
    """The request ids of an encoded ``AddRequests`` (``["add", [[request_id, ...], ...]]``), or []."""
    if not (isinstance(item, list) and len(item) == 2 and item[0] == "add" and isinstance(item[1], list)):
        return []
    ids = [spec[0] for spec in item[1] if isinstance(spec, list) and spec and isinstance(spec[0], str)]
    return ids if len(ids) == len(item[1]) else []

# ---- what the front end raises ---------------------------------------------------------------------------------


class EngineDeadError(RuntimeError):
    """The engine has stopped (a fatal fault or shut-down) and serves no more requests."""


class EngineSleepingError(RuntimeError):
    """The engine sleeps (``sleep``) and takes no requests until ``wake_up``; try again after ``retry_after``
    seconds."""

    def __init__(self, message: str = "the engine is sleeping (sleep mode): wake it up first", retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineBusyError(RuntimeError):
    """A control command the core refused for now: requests are unfinished (weights change and the engine sleeps
    only between requests) or the engine sleeps."""


class RequestFailedError(RuntimeError):
    """An engine step holding this request failed; the engine itself goes on."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequestError(ValueError):
    """A request the model cannot take; ``param`` names the offending field when one does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
