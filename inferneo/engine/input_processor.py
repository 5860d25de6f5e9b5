"""The front end's input side: the tokenizer, the model's sampling defaults, and the one set of request rules.

Every request, from ``LLM.generate``, the HTTP server or a batch job, is checked here and nowhere else; the core
trusts what it is sent. The rules, with the limits of the loaded core (its ``CoreInfo``):

- the prompt has at least one token, every id is in the vocabulary, and it leaves room for one token to generate;
- prompt + ``max_tokens`` fits in the context length: a request asking for more is refused, never silently cut
  short (as OpenAI and vLLM's server do); ``max_tokens=None`` means "up to the context length";
- prompt + ``max_tokens`` fits in the KV cache (otherwise it could never be scheduled);
- ``logprobs`` and ``prompt_logprobs`` are at most :attr:`InputProcessor.max_logprobs` (``--max-logprobs``, 20
  by default; -1: the vocabulary size); the ids of ``logit_bias``,
  ``allowed_token_ids`` and ``bad_words`` (tokenized by :meth:`InputProcessor.resolve`) are in the vocabulary;
- a ``structured_outputs`` constraint parses (xgrammar reads the schema, regex or grammar; the core compiles it
  against the vocabulary later);
- a non-zero ``priority`` needs a core that schedules by priority: under FCFS it would be silently ignored, so it is
  refused, as vLLM refuses it ("Priority scheduling is not enabled").

Embedding requests (:meth:`InputProcessor.check_embedding`) follow their own rules: at least one token, every id
in the vocabulary, at most the context length and the KV cache (nothing is generated, so the whole context may
be prompt), a model whose pooling is served, and ``dimensions`` as the model's ``PoolingConfig`` allows. Their
``truncate_prompt_tokens`` (:meth:`InputProcessor.truncation_length`) cuts an over-long input as vLLM does: a text
by the tokenizer (its special tokens kept, a pair's longer text cut first), token ids to their last tokens.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from inferneo.config import EngineConfig
from inferneo.engine.prompt_embeds import (
    PLACEHOLDER_TOKEN_ID,
    PromptEmbeds,
    PromptEmbedsError,
    check_prompt_embeds,
)
from inferneo.engine.protocol import CoreInfo, InvalidRequestError, PoolingRequest
from inferneo.model_loader import generation_config_for, load_tokenizer
from inferneo.model_loader.loader import SAMPLING_DEFAULT_KEYS, load_hf_config
from inferneo.multimodal.chat import take_images, template_reads_parts
from inferneo.multimodal.config import vision_language_of
from inferneo.multimodal.inputs import ImageInput
from inferneo.multimodal.limits import max_images
from inferneo.multimodal.prompts import ImagePromptError, ImagePrompts
from inferneo.sampling_params import SamplingParams
from inferneo.structured_output import StructuredOutputError, check_structured_outputs

logger = logging.getLogger(__name__)

TRUNCATE_PARAM = "truncate_prompt_tokens"

# the SamplingParams fields a generation config sets (its do_sample only says whether temperature applies)
_SAMPLING_DEFAULT_KEYS = tuple(k for k in SAMPLING_DEFAULT_KEYS if k != "do_sample")


def _tokenizer_size(tokenizer) -> int | None:
    """The number of token ids the tokenizer can produce (its vocabulary with added tokens), when it says."""
    try:
        return len(tokenizer)
    except TypeError:
        return None


class InputProcessor:
    """Tokenizes prompts and checks requests against one set of rules (see the module docstring)."""

    def __init__(self, tokenizer, generation_config: dict, limits: CoreInfo,
                 images: ImagePrompts | None = None) -> None:
        self.tokenizer = tokenizer
        self.images = images  # a vision-language model's image side (None: the model takes text only)
        self.generation_config = generation_config
        self.limits = limits
        self.generation_defaults = default_sampling_params(generation_config)
        self.eos_token_ids = eos_token_ids(generation_config, tokenizer)
        tokens = _tokenizer_size(tokenizer)
        if limits.generates and tokens is not None and tokens > limits.vocab_size:
            logger.warning("the tokenizer has %d tokens but the model's vocabulary has %d: text that tokenizes to "
                           "ids from %d up will be refused (a tokenizer from another model, or added tokens the "
                           "embedding was not resized for?)", tokens, limits.vocab_size, limits.vocab_size)

    @classmethod
    def load_tokenizer(cls, config: EngineConfig) -> tuple[object, dict]:
        """The tokenizer and generation config of ``config``'s model (the front end's half of loading it)."""
        source = config.model_ref().resolve()
        return (load_tokenizer(source, config.tokenizer_ref(), config.chat_template),
                generation_config_for(source, config.generation_config,
                                      config.override_generation_config))

    @classmethod
    def load_image_prompts(cls, config: EngineConfig, tokenizer) -> ImagePrompts | None:
        """The image side of ``config``'s model when it is a vision-language model (None otherwise)."""
        source = config.model_ref().resolve()
        if source.kind != "hf_dir":
            return None
        vision_language = vision_language_of(load_hf_config(source, config.hf_overrides))
        if vision_language is None:
            return None
        local = Path(config.allowed_local_media_path) if config.allowed_local_media_path else None
        return ImagePrompts(source.path, vision_language, tokenizer, max_images(config.limit_mm_per_prompt), local)

    def conversation_images(self, conversation: list[dict], chat_template: str | None = None
                            ) -> tuple[list[dict], list]:
        """A conversation for the chat template (``chat_template``, else the tokenizer's) and its images in order
        (``multimodal.chat.take_images`` with this model's image placeholder and the template's content format);
        ValueError when it has images and the model takes text only."""
        placeholder = self.images.chat_placeholder if self.images is not None else None
        return take_images(conversation, placeholder, template_reads_parts(self.tokenizer, chat_template))

    def prepare_images(self, prompt_ids: list[int], images: list | None,
                       truncate_prompt_tokens: int | None = None) -> tuple[list[int], list[ImageInput] | None]:
        """The prompt with its image placeholders expanded and its images preprocessed
        (``ImagePrompts.prepare``); a text model's prompt as it is, and ``InvalidRequestError`` if it came with
        images. Raises ``InvalidRequestError`` naming ``multi_modal_data`` when the images do not fit the prompt."""
        if self.images is None:
            if images:
                raise InvalidRequestError("this model takes text only: it cannot read images", "multi_modal_data")
            return prompt_ids, None
        if images and truncate_prompt_tokens is not None:
            raise InvalidRequestError("truncate_prompt_tokens cannot be combined with images",
                                      TRUNCATE_PARAM)
        try:
            return self.images.prepare(prompt_ids, images)
        except ImagePromptError as exc:
            raise InvalidRequestError(str(exc), "multi_modal_data") from None

    def prepare_prompt_embeds(self, embeds: object, params: SamplingParams, keep: int | None = None,
                              param: str = "prompt_embeds") -> tuple[list[int], PromptEmbeds]:
        """A prompt given as embeddings (``check_prompt_embeds``: ``[num_tokens, hidden_size]`` floats) as the
        core takes it: one placeholder token id per row, and the rows. Raises ``InvalidRequestError`` naming
        ``param`` when the engine does not take prompt embeddings (``CoreInfo.prompt_embeds_refusal``) or the
        tensor is not such a prompt, naming ``prompt_logprobs`` when they are asked for (a prompt without tokens has
        none to score, as vLLM refuses them). ``keep`` (``truncate_prompt_tokens``) keeps the last rows, as a token
        prompt's last tokens (vLLM's)."""
        if self.limits.prompt_embeds_refusal is not None:
            raise InvalidRequestError(self.limits.prompt_embeds_refusal, param)
        try:
            tensor = check_prompt_embeds(embeds, self.limits.hidden_size)
        except PromptEmbedsError as exc:
            raise InvalidRequestError(str(exc), param) from None
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs are not compatible with prompt embeddings: the prompt has no "
                                      "tokens to score", "prompt_logprobs")
        kept = len(truncate_prompt([PLACEHOLDER_TOKEN_ID] * tensor.shape[0], keep,
                                   self.limits.max_model_len, params.max_tokens))
        return [PLACEHOLDER_TOKEN_ID] * kept, PromptEmbeds.from_tensor(tensor[tensor.shape[0] - kept:])

    def default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults (a fresh copy each call)."""
        return self.generation_defaults.clone()

    def decoding_tokenizer(self):
        """A tokenizer of its own for detokenizing in another thread than the one tokenizing prompts."""
        try:
            return copy.deepcopy(self.tokenizer)
        except Exception:
            return self.tokenizer

    def tokenize(
        self, text: str, add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[int]:
        """Token ids of ``text``. Not ``verbose``: a prompt longer than the tokenizer's ``model_max_length`` is
        ``check``'s to refuse, without transformers' warning about indexing errors first. ``max_length`` (from
        :meth:`truncation_length`) cuts the text as the tokenizer truncates (see :func:`truncation_kwargs`)."""
        return self.tokenizer(
            text, add_special_tokens=add_special_tokens, verbose=False, **truncation_kwargs(max_length)
        ).input_ids

    def tokenize_pair(
        self, first: str, second: str, max_length: int | None = None
    ) -> tuple[list[int], int | None]:
        """Token ids of two texts read as one input, joined as the tokenizer joins a pair (a cross-encoder's
        ``<s> query </s></s> document </s>``), with its special tokens, and the first position of token type 1
        (BERT's second segment; None when the tokenizer gives every token type 0, as RoBERTa's does).
        ``max_length`` (from :meth:`truncation_length`) cuts the pair to that many tokens, longest text first."""
        encoded = self.tokenizer(first, second, verbose=False, **truncation_kwargs(max_length))
        return encoded.input_ids, pair_type_start(encoded.get("token_type_ids"))

    def truncation_length(self, keep: int | None, pair: bool = False, text: bool = True) -> int | None:
        """vLLM's ``truncate_prompt_tokens`` of an embedding or scoring request, as the number of tokens to keep
        (None: no truncation). ``-1`` is the most an input may have (the context length, within the KV cache).
        Raises ``InvalidRequestError`` naming ``truncate_prompt_tokens`` for 0 or below -1, for more than the
        context length, and (when a ``text`` is to be tokenized) for fewer tokens than the tokenizer's special
        tokens of one input (``pair``: of a pair), which no truncation of a text can meet."""
        if keep is None:
            return None
        limit = self.embedding_limit
        if keep == -1:
            return limit
        if keep < 1:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be at least 1 (the tokens to keep) or -1 (as many as the model "
                f"takes), got {keep}",
                TRUNCATE_PARAM,
            )
        if keep > limit:
            raise InvalidRequestError(
                f"truncate_prompt_tokens: {keep} is more than an input may have ({limit} tokens: the model's "
                "context length and KV cache)",
                TRUNCATE_PARAM,
            )
        special = _special_tokens(self.tokenizer, pair) if text else 0
        if keep < special:
            what = "a pair" if pair else "an input"
            raise InvalidRequestError(
                f"truncate_prompt_tokens: {keep} is fewer than the {special} special tokens the tokenizer adds "
                f"to {what}",
                TRUNCATE_PARAM,
            )
        return keep

    @property
    def embedding_limit(self) -> int:
        """The most tokens an embedding or scoring input may have: the context length, within the KV cache."""
        return min(self.limits.max_model_len, self.limits.kv_capacity_tokens)

    def check(self, prompt_token_ids: list[int], params: SamplingParams, param: str = "prompt",
              priority: int = 0) -> int:
        """Raise ``InvalidRequestError`` (naming the field) unless the request may run; returns the number of
        tokens it may generate (``params.max_tokens``, or the rest of the context when that is None)."""
        limits = self.limits
        self.check_generates()
        self.check_priority(priority)
        n = len(prompt_token_ids)
        vocab = limits.vocab_size
        _check_token_ids(prompt_token_ids, vocab, "prompt", param)
        if n >= limits.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context length is {limits.max_model_len} tokens "
                "(at least one token must be left to generate): shorten the prompt", param)
        if params.max_tokens is None:
            max_tokens = limits.max_model_len - n
        elif n + params.max_tokens > limits.max_model_len:
            raise InvalidRequestError(
                f"the model's context length is {limits.max_model_len} tokens, but {n + params.max_tokens} were "
                f"asked for ({n} in the prompt, {params.max_tokens} in max_tokens): lower max_tokens or shorten "
                "the prompt", "max_tokens")
        else:
            max_tokens = params.max_tokens
        if n + max_tokens > limits.kv_capacity_tokens:
            raise InvalidRequestError(
                f"the request needs up to {n + max_tokens} tokens of KV cache ({n} in the prompt, {max_tokens} to "
                f"generate) but the cache holds {limits.kv_capacity_tokens}: lower max_tokens or give the cache "
                "more memory", "max_tokens")
        if params.bad_words and params.bad_words_token_ids is None:
            raise InvalidRequestError("bad_words must be tokenized first (InputProcessor.resolve)", "bad_words")
        if (error := params.token_id_error(vocab)) is not None:
            raise InvalidRequestError(*error)
        if outside := sorted({t for t in params.stop_token_ids if t >= vocab}):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab} (such a token is "
                                      f"never generated); got {outside[:5]}", "stop_token_ids")
        self.check_logprobs(params.logprobs, "logprobs")
        self.check_logprobs(params.prompt_logprobs, "prompt_logprobs")
        if params.prompt_logprobs is not None and not limits.scores_prompts:
            raise InvalidRequestError("prompt_logprobs are not supported with pipeline parallelism "
                                      "(--pipeline-parallel-size > 1)", "prompt_logprobs")
        if params.structured_outputs is not None:
            try:
                check_structured_outputs(params.structured_outputs)
            except StructuredOutputError as e:
                raise InvalidRequestError(str(e), e.param) from None
        return max_tokens

    @property
    def max_logprobs(self) -> int:
        """The most log-probabilities a request may ask for per token: ``EngineConfig.max_logprobs`` (vLLM's
        ``--max-logprobs``, 20 by default), at most the vocabulary size (-1: the vocabulary size)."""
        limit = self.limits.max_logprobs
        vocab = self.limits.vocab_size
        return vocab if limit == -1 else min(limit, vocab)

    def check_logprobs(self, value: int | None, param: str) -> None:
        """Raise ``InvalidRequestError`` naming ``param`` (``logprobs``, ``top_logprobs``, ``prompt_logprobs``)
        when ``value`` asks for more log-probabilities than :attr:`max_logprobs`."""
        if value is not None and value > (limit := self.max_logprobs):
            raise InvalidRequestError(
                f"{param} must be at most {limit}, got {value} (the server's limit: --max-logprobs, "
                "LLM(max_logprobs=...); -1 allows up to the vocabulary size)",
                param,
            )

    def check_beam_width(self, width: int, param: str) -> None:
        """Raise ``InvalidRequestError`` naming ``param`` when a beam search of ``width`` beams would ask each step
        for more candidates (``2 * width``) than :attr:`max_logprobs` allows."""
        if 2 * width > (limit := self.max_logprobs):
            raise InvalidRequestError(
                f"a beam search of width {width} asks each step for {2 * width} log-probabilities, but this engine "
                f"returns at most {limit} (--max-logprobs): use a width of at most {limit // 2}",
                param,
            )

    def check_generates(self) -> None:
        """Raise ``InvalidRequestError`` (naming ``model``) when the model does not generate (it embeds, classifies
        or scores)."""
        if not self.limits.generates:
            raise InvalidRequestError("this model serves embeddings, classes or scores only (an encoder such as BERT, "
                                      "a ...ForSequenceClassification checkpoint, or one saved without its "
                                      "language-model head, lm_head): it cannot generate", "model")

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """``params`` as the core takes them: with ``bad_words`` tokenized into ``bad_words_token_ids`` (a copy;
        the caller's object is left as it was), or ``params`` itself when there is nothing to tokenize."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        resolved = params.clone()
        resolved.bad_words_token_ids = self.bad_words_token_ids(params.bad_words)
        return resolved

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's tokenizations, as the answer may spell it: at the start of a text and after a space (the form
        a word takes mid-sentence for most tokenizers), each distinct one once."""
        sequences: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenize(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def check_priority(self, priority: int) -> None:
        """Raise ``InvalidRequestError`` for a non-zero ``priority`` when the core does not schedule by priority
        (it would be ignored without a word)."""
        if priority != 0 and not self.limits.schedules_by_priority:
            raise InvalidRequestError(
                f"priority {priority} was given but priority scheduling is not enabled: this engine serves requests "
                "first come, first served (start it with --scheduling-policy priority, or "
                "LLM(scheduling_policy='priority')); leave priority out or 0", "priority")

    def check_embedding(self, prompt_token_ids: list[int], pooling: PoolingRequest, param: str = "input",
                        priority: int = 0) -> None:
        """Raise ``InvalidRequestError`` (naming the field) unless the embedding request may run."""
        limits = self.limits
        n = len(prompt_token_ids)
        self.check_pooling(pooling)
        self.check_priority(priority)
        _check_token_ids(prompt_token_ids, limits.vocab_size, "input", param)
        limit = self.embedding_limit
        if n > limit:
            raise InvalidRequestError(f"the input has {n} tokens but at most {limit} fit (the model's context length "
                                      "and KV cache): shorten it", param)
        if (error := limits.pooling.dimensions_error(pooling.dimensions)) is not None:
            raise InvalidRequestError(error, "dimensions")

    def check_pooling(self, pooling: PoolingRequest) -> None:
        """Raise ``InvalidRequestError`` (naming ``model``) unless the model serves ``pooling``'s task: embeddings
        from an embedding model; classes from a sequence classifier, and scores from one of one label."""
        model = self.limits.pooling
        if pooling.task == "embed" and model.task != "embed":
            raise InvalidRequestError(
                "this model is a sequence classifier (a cross-encoder): it classifies (LLM.classify, /classify) and, "
                "with one label, scores (query, document) pairs (LLM.score, /v1/score, /v1/rerank); it does not "
                "embed", "model")
        if pooling.task == "score" and model.task != "classify":
            raise InvalidRequestError(
                "this model does not score pairs: scoring needs a cross-encoder (a BertForSequenceClassification, "
                "RobertaForSequenceClassification or XLMRobertaForSequenceClassification checkpoint, or a decoder "
                "...ForSequenceClassification of one label)", "model")
        if pooling.task == "classify" and model.task != "classify":
            raise InvalidRequestError(
                "this model does not classify: classification needs a sequence classifier (a "
                "...ForSequenceClassification checkpoint, e.g. Qwen2ForSequenceClassification or "
                "RobertaForSequenceClassification); this one "
                + ("generates text and embeds" if self.limits.generates else "serves embeddings"), "model")
        if model.unsupported is not None:
            what = {"embed": "embeddings", "score": "scores", "classify": "classifications"}[pooling.task]
            raise InvalidRequestError(f"this model does not serve {what}: {model.unsupported}", "model")
        if pooling.task == "score" and model.score_unsupported is not None:
            raise InvalidRequestError(f"this model does not score pairs: {model.score_unsupported}", "model")


class FrontEndFacts:
    """The facts both front ends (``LLMEngine``, ``AsyncEngine``) expose, read from their ``info`` (the core's
    ``CoreInfo``) and ``input`` (their ``InputProcessor``)."""

    info: CoreInfo
    input: InputProcessor

    @property
    def tokenizer(self):
        return self.input.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def kv_capacity_tokens(self) -> int:
        return self.info.kv_capacity_tokens

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.input.eos_token_ids

    def default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults (from its ``generation_config.json``, as vLLM does), else the usual
        ones; a fresh copy each call."""
        return self.input.default_sampling_params()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.input.tokenize(text, add_special_tokens)


def truncate_prompt(prompt_ids: list[int], keep: int | None, max_model_len: int,
                    max_tokens: int | None) -> list[int]:
    """vLLM's ``truncate_prompt_tokens`` of a generation request: the prompt's last ``keep`` tokens (``-1``: as many
    as leave room in the context for ``max_tokens``, or for one token when that is unset); the prompt itself when
    ``keep`` is None. A ``keep`` past the context length is an ``InvalidRequestError`` naming the field."""
    if keep is None:
        return prompt_ids
    if keep == -1:
        keep = max(max_model_len - (max_tokens or 1), 1)
    elif keep > max_model_len:
        raise InvalidRequestError(f"truncate_prompt_tokens: {keep} is more than the model's context length "
                                  f"({max_model_len} tokens)", "truncate_prompt_tokens")
    return prompt_ids[-keep:]


def check_cache_salt(salt: object) -> str | None:
    """``salt`` as a request's ``cache_salt`` (None: unsalted); ``InvalidRequestError`` naming ``cache_salt`` unless
    it is a non-empty string."""
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequestError(f"cache_salt must be a non-empty string, got {salt!r:.40}", "cache_salt")
    return salt


def truncation_kwargs(max_length: int | None) -> dict:
    """The tokenizer's keyword arguments that cut its output to ``max_length`` tokens (none when None), as vLLM
    truncates a text: the tokenizer's own way, so on its ``truncation_side`` (the end of the text unless the
    tokenizer says ``left``), its special tokens kept; a pair is cut longest text first."""
    if max_length is None:
        return {}
    return {"truncation": "longest_first", "max_length": max_length}


def truncate_token_ids(token_ids: list[int], max_length: int | None) -> list[int]:
    """Token ids given as such, cut to their last ``max_length`` (vLLM keeps a token-id input's end)."""
    return token_ids if max_length is None else token_ids[-max_length:]


def _special_tokens(tokenizer, pair: bool) -> int:
    """How many special tokens the tokenizer adds to one text (``pair``: to two), 0 when it does not say."""
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=pair))
    except (AttributeError, TypeError, NotImplementedError):
        return 0


def pair_type_start(token_type_ids: list[int] | None) -> int | None:
    """The first position of token type 1 in a tokenized pair, None when there is none; ValueError unless the
    types are one run of 0 and one of 1 (the two segments)."""
    if not token_type_ids or 1 not in token_type_ids:
        return None
    start = token_type_ids.index(1)
    if set(token_type_ids[:start]) != {0} or set(token_type_ids[start:]) != {1}:
        raise ValueError(f"the tokenizer's token types of a pair are not two segments: {token_type_ids[:64]}")
    return start


def _check_token_ids(token_ids: list[int], vocab: int, what: str, param: str) -> None:
    """At least one token, each an integer id of the vocabulary (``what``: "prompt" or "input")."""
    if not token_ids:
        raise InvalidRequestError(f"the {what} is empty: give at least one token", param)
    bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"{what} token ids must be integers in [0, {vocab}); got {bad[:5]}", param)


def default_sampling_params(generation_config: dict) -> SamplingParams:
    """Sampling defaults from a model's ``generation_config.json`` (as vLLM does), else the usual ones."""
    values = {k: generation_config[k] for k in _SAMPLING_DEFAULT_KEYS if k in generation_config}
    if "temperature" in values and not generation_config.get("do_sample", True):
        values["temperature"] = 0.0
    try:
        return SamplingParams(**values)
    except ValueError:
        return SamplingParams()


def eos_token_ids(generation_config: dict, tokenizer) -> frozenset[int]:
    """The ids that end a sequence: the generation config's ``eos_token_id`` (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    eos = generation_config.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(e for e in eos if isinstance(e, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
