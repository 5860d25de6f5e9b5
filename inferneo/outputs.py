"""What a finished (or streaming) request hands back to the user."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """The log-probability of one candidate token, its rank in the distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One generated position: token id -> Logprob, holding the sampled token and the top-k candidates.
SampleLogprobs = list[dict[int, Logprob]]
# Every prompt position (vLLM's shape): None for the first token, which nothing predicts; then token id -> Logprob
# holding the prompt token itself and the top-k candidates at that position.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (a request with ``n > 1`` has several)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    # "stop", "length", "abort", "error" (its structured-output constraint allowed no next token) or None while
    # running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt and its generated sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # Set when SamplingParams.prompt_logprobs was (in a stream: on the first output only).
    prompt_logprobs: PromptLogprobs | None = None
    # A prompt given as embeddings: its number of rows (its ``prompt`` is None and ``prompt_token_ids`` empty).
    num_prompt_embeds: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        """The prompt's positions: its tokens, or its embedding rows."""
        return len(self.prompt_token_ids) + self.num_prompt_embeds


@dataclass(slots=True)
class EmbeddingOutput:
    """The embedding of one input: its pooled hidden state (normalised when the model normalises)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns for one input (vLLM's shape: the vector is ``outputs.embedding``)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass(slots=True)
class ScoringOutput:
    """A cross-encoder's score of one (query, document) pair."""

    score: float


@dataclass(slots=True)
class ScoringRequestOutput:
    """What ``LLM.score`` returns for one pair (vLLM's shape: the score is ``outputs.score``); ``prompt_token_ids``
    are the pair's tokens, read as one input."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass(slots=True)
class ClassificationOutput:
    """A sequence classifier's class probabilities for one input (vLLM's ``ClassificationOutput``): the softmax of
    its logits over the labels (the sigmoid of the logit for a one-label classifier), in ``id2label`` order."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(slots=True)
class ClassificationRequestOutput:
    """What ``LLM.classify`` returns for one input (vLLM's shape: the probabilities are ``outputs.probs``)."""

    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True
