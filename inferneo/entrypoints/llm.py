"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))`` and ``LLM.chat(conversations)``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from inferneo.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, step_sampling_params
from inferneo.config import EngineConfig
from inferneo.engine.input_processor import check_cache_salt, truncate_token_ids
from inferneo.engine.llm_engine import LLMEngine
from inferneo.engine.protocol import InvalidRequestError, LoraRef, PoolingRequest
from inferneo.entrypoints.chat_template_kwargs import template_kwargs_error
from inferneo.entrypoints.score_pairs import score_pairs
from inferneo.json_text import object_or_text
from inferneo.lora.request import LoRARequest
from inferneo.multimodal.chat import (
    IMAGE_MARK,
    IMAGES_KEY,
    image_part_url,
    is_image_part,
)
from inferneo.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from inferneo.sampling_params import SamplingParams

Prompt = str | list[int]
# vLLM's ``TextPrompt`` ({"prompt": text}) and ``TokensPrompt`` ({"prompt_token_ids": ids}) dicts
PromptDict = dict[str, Any]
PromptInput = Prompt | PromptDict
Conversation = list[dict[str, Any]]
# ``use_tqdm``: show a progress bar or not, or (as vLLM) a factory called like ``tqdm(total=..., desc=...)``
ProgressBar = bool | Callable[..., tqdm]


class LLM:
    """Runs a model in this process and generates for many prompts at once.

    ``LLM()`` loads the bundled default model. ``model`` may be a local Hugging Face folder, a hub id found in the
    local Hugging Face cache, or a ``.gguf`` file. Other keyword arguments are ``EngineConfig`` fields (the same
    options as the command line's engine flags), e.g. ``dtype="bfloat16"``, ``max_model_len=4096``,
    ``kv_cache_memory="2GiB"``, ``max_num_seqs=128``.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - {f.name for f in fields(EngineConfig)}
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(sorted(unknown))} (the engine options are "
                            "EngineConfig's fields)")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine (vLLM's name for it; also ``engine``)."""
        return self.engine

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's helper processes (tensor-parallel workers). Also happens at interpreter exit."""
        self.engine.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    # ---- reinforcement learning: new weights, prefix cache, sleep mode (docs/offline-inference.md) ----------

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new values into the running model: ``(name, tensor)`` pairs named as in the checkpoint (Hugging
        Face names), the whole model or any part of it. Checked first (``ValueError`` and nothing changed for a
        name the model does not have, a wrong shape, or quantized / LoRA / pipeline-parallel weights), then loaded where
        the model's fast paths read them; the prefix cache is reset. Runs between requests only
        (``EngineBusyError`` while requests are unfinished or the engine sleeps)."""
        self.engine.update_weights(weights)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block no running request holds; True when none is left cached."""
        return self.engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free memory between rollouts. Level 1 frees the KV cache (on CUDA the weights also move to pinned host
        memory; on CPU they stay); level 2 also drops the weights: after ``wake_up`` they are zeros and must be
        loaded again with ``update_weights`` (vLLM's semantics) before requests are taken. Requests are refused
        while it sleeps (``EngineSleepingError``)."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        """End sleep mode: the weights back on the device (level 1) and an empty KV cache."""
        self.engine.wake_up()

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: ProgressBar = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or many; returns one ``RequestOutput`` per prompt, in input order.

        A prompt is a string, a list of token ids, or vLLM's prompt dicts: ``{"prompt": text}`` (``TextPrompt``) or
        ``{"prompt_token_ids": ids}`` (``TokensPrompt``), either with vLLM's ``"cache_salt"`` (the prompt's
        prefix-cache blocks then serve only prompts with the same salt) and, for a vision-language model, vLLM's
        ``"multi_modal_data": {"image": image or [images]}`` (PIL images or image URLs, one for each image
        placeholder of the prompt, such as LLaVA's ``<image>``). ``sampling_params`` is one for all prompts
        or one each; ``priority`` (lower runs first under the ``priority`` policy) is one value per prompt.
        ``lora_request`` (with ``enable_lora=True``) runs the prompts with a LoRA adapter: one for all, or one (or
        None) each.

        With ``enable_prompt_embeds=True``, a prompt may also be given as embeddings, vLLM's ``EmbedsPrompt``:
        ``{"prompt_embeds": tensor}``, a ``[num_tokens, hidden_size]`` float tensor of what the model's input
        embedding layer produces (Hugging Face's ``model.get_input_embeddings()(ids)``), optionally with a
        ``"cache_salt"``. Its output has ``prompt`` None and no ``prompt_token_ids`` (``docs/offline-inference.md``,
        "Prompt embeddings").
        """
        prompt_list = _as_prompt_list(prompts, salted=True)
        return self._run(prompt_list, sampling_params, priority, use_tqdm, lora_request,
                         cache_salts=_cache_salts(prompts), images=_prompt_images(prompts),
                         embeds=_prompt_embeds(prompts))

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        dimensions: int | None = None,
        use_tqdm: ProgressBar = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """Embed one prompt or many (strings, token-id lists or prompt dicts, as ``generate``); returns one
        ``EmbeddingRequestOutput`` per prompt, in input order, with the vector in ``.outputs.embedding``.

        The model pools as its sentence-transformers files say, else by its last token, normalised (see
        ``docs/embeddings.md``); ``dimensions`` shortens the vectors of a Matryoshka model. Embedding requests run
        through the same scheduler as generation: prefill only, no KV kept afterwards.
        ``truncate_prompt_tokens`` (vLLM's) cuts each prompt to that many tokens instead of refusing a longer one
        (-1: to the most the model takes): a text as the tokenizer truncates it (its end goes, the special tokens
        stay), token ids to their last ones.
        """
        return self._pool(prompts, PoolingRequest(dimensions), truncate_prompt_tokens, use_tqdm, "embed",
                          "Embedded prompts")

    def classify(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        use_tqdm: ProgressBar = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Classify one prompt or many (strings, token-id lists or prompt dicts, as ``generate``) with a sequence
        classifier (a ``...ForSequenceClassification`` checkpoint); returns one ``ClassificationRequestOutput`` per
        prompt, in input order, with the class probabilities in ``.outputs.probs`` (``id2label`` order).

        As vLLM's ``classify``: the probabilities are the softmax of the classifier's logits, or the sigmoid of the
        logit when it has one label. A decoder classifier reads the prompt's last token, a BERT-family one its
        first (see ``docs/embeddings.md``). Classification requests run through the same scheduler as generation:
        prefill only, no KV kept afterwards. ``truncate_prompt_tokens`` cuts each prompt as ``embed``'s does.
        """
        outputs = self._pool(prompts, PoolingRequest(task="classify"), truncate_prompt_tokens, use_tqdm, "classify",
                             "Classified prompts")
        model = self.engine.info.pooling
        return [ClassificationRequestOutput(o.request_id, ClassificationOutput(model.probabilities(o.outputs.embedding)),
                                            o.prompt_token_ids) for o in outputs]

    def _pool(self, prompts: PromptInput | Sequence[PromptInput], pooling: PoolingRequest,
              truncate_prompt_tokens: int | None, use_tqdm: ProgressBar, kind: str,
              desc: str) -> list[EmbeddingRequestOutput]:
        """Run ``prompts`` as pooling requests (``embed``'s and ``classify``'s shared work), each cut by
        ``truncate_prompt_tokens``; their outputs in order (all aborted if one cannot be added)."""
        prompt_list = _as_prompt_list(prompts)
        engine = self.engine
        max_length = engine.input.truncation_length(
            truncate_prompt_tokens, text=any(isinstance(p, str) for p in prompt_list)
        )
        base = f"{kind}-{time.monotonic_ns()}-"
        ids = []
        try:
            for i, prompt in enumerate(prompt_list):
                token_ids = (engine.input.tokenize(prompt, max_length=max_length) if isinstance(prompt, str)
                             else truncate_token_ids(prompt, max_length))
                ids.append(engine.add_embedding_request(base + str(i), token_ids, pooling))
            return self._collect(ids, use_tqdm, desc)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise

    def beam_search(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: ProgressBar = False,
        priority: Sequence[int] | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search (vLLM's): for each prompt, the ``params.beam_width`` most likely continuations of at most
        ``params.max_tokens`` tokens, best first, as one ``BeamSearchOutput`` per prompt, in input order.

        Prompts are as ``generate``'s; ``lora_request`` and ``priority`` too. Each sequence's ``tokens`` are the
        prompt's and the generated ids and its ``text`` their decoding (vLLM's shape); ``output_text`` and
        ``output_token_ids`` hold the generated part. How beams are ranked: ``inferneo.beam_search``. The prompts'
        beams are scored together, one engine request per beam and step, the prefix cache serving what earlier steps
        computed (keep ``enable_prefix_caching`` on). ``use_tqdm`` shows the steps.
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompt_list = _as_prompt_list(prompts, salted=True)
        salts = _cache_salts(prompts)
        if any(_prompt_images(prompts)):
            raise ValueError("beam_search takes text prompts only: multi_modal_data is not supported here")
        if any(e is not None for e in _prompt_embeds(prompts)):
            raise ValueError("beam_search takes text prompts only: prompt_embeds are not supported here")
        n = len(prompt_list)
        loras = _lora_refs(lora_request, n)
        _check_priority(priority, n)
        engine = self.engine
        engine.input.check_beam_width(params.beam_width, "beam_width")
        token_lists = [engine.tokenize(p) if isinstance(p, str) else list(p) for p in prompt_list]
        whole = SamplingParams(max_tokens=params.max_tokens, temperature=0.0)
        for i, ids in enumerate(token_lists):
            try:
                engine.input.check(ids, whole, priority=priority[i] if priority else 0)
            except ValueError as exc:
                raise type(exc)(f"prompt {i}: {exc}" if n > 1 else str(exc)) from None
        searches = [BeamSearch(ids, params, engine.input.eos_token_ids) for ids in token_lists]
        step_params = step_sampling_params(params)
        base = f"beam-{time.monotonic_ns()}-"
        bar = (use_tqdm(total=params.max_tokens, desc="Beam search", dynamic_ncols=True) if callable(use_tqdm)
               else tqdm(total=params.max_tokens, desc="Beam search", dynamic_ncols=True, disable=not use_tqdm))
        try:
            for step in range(params.max_tokens):
                pending = [search.pending() for search in searches]
                if not any(pending):
                    break
                ids = []
                try:
                    for i, beams in enumerate(pending):
                        for b, tokens in enumerate(beams):
                            ids.append(engine.add_request(f"{base}{step}-{i}-{b}", tokens, step_params,
                                                          priority[i] if priority else 0, lora=loras[i],
                                                          cache_salt=salts[i]))
                except BaseException:
                    for request_id in ids:
                        engine.abort_request(request_id)
                    raise
                scored = iter(self._collect(ids, False, "Beam search"))
                for search, beams in zip(searches, pending, strict=True):
                    if beams:
                        search.advance([next(scored).outputs[0].logprobs[0] for _ in beams])
                bar.update(1)
        finally:
            bar.close()
        tokenizer = engine.tokenizer
        results = []
        for search in searches:
            sequences = search.best()
            for sequence in sequences:
                sequence.text = tokenizer.decode(sequence.tokens, skip_special_tokens=True)
                sequence.output_text = tokenizer.decode(sequence.text_token_ids(), skip_special_tokens=True)
                for position in sequence.logprobs:
                    for token_id, logprob in position.items():
                        if logprob.decoded_token is None:
                            logprob.decoded_token = tokenizer.decode([token_id])
            results.append(BeamSearchOutput(sequences))
        return results

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        use_tqdm: ProgressBar = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """Score (query, document) pairs with a cross-encoder (a reranker such as bge-reranker-v2-m3); returns one
        ``ScoringRequestOutput`` per pair, in order, with the score in ``.outputs.score``.

        As vLLM's: ``data_1`` is one text scored against each text of ``data_2`` (one or a list), or a list as
        long as ``data_2``, scored pairwise. Each pair is tokenized as the tokenizer joins two texts
        (``<s> query </s></s> document </s>``) and read as one input; the score is sentence-transformers'
        ``CrossEncoder.predict`` (see ``docs/embeddings.md``). ``truncate_prompt_tokens`` (vLLM's) cuts each pair
        to that many tokens instead of refusing a longer one (-1: to the most the model takes), as the tokenizer
        truncates a pair: tokens go from the end of the longer text first, the special tokens stay.
        """
        pairs = score_pairs(data_1, data_2)
        engine = self.engine
        engine.input.check_pooling(PoolingRequest(task="score"))
        max_length = engine.input.truncation_length(truncate_prompt_tokens, pair=True)
        base = f"score-{time.monotonic_ns()}-"
        ids = []
        try:
            for i, (first, second) in enumerate(pairs):
                token_ids, type_start = engine.input.tokenize_pair(first, second, max_length)
                pooling = PoolingRequest(task="score", token_type_start=type_start)
                ids.append(engine.add_embedding_request(base + str(i), token_ids, pooling))
            outputs = self._collect(ids, use_tqdm, "Scored pairs")
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        model = engine.info.pooling
        return [ScoringRequestOutput(o.request_id, ScoringOutput(model.score(o.outputs.embedding)), o.prompt_token_ids)
                for o in outputs]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: ProgressBar = True,
        add_generation_prompt: bool | None = None,
        chat_template: str | None = None,
        priority: Sequence[int] | None = None,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them with the model's chat template. Each output's ``prompt`` is
        its conversation as the template rendered it. ``add_generation_prompt`` (default: true unless
        ``continue_final_message``) ends the prompt with a new assistant turn; ``continue_final_message`` instead
        ends it at the end of each conversation's last message, an assistant's prefix, which the answer
        continues. ``tools`` (OpenAI function definitions) and ``chat_template_kwargs`` (extra template variables,
        e.g. ``{"enable_thinking": False}``) go to the template for every conversation; ``lora_request`` is as
        ``generate``'s."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a conversation (a list of {'role': ..., 'content': ...} dicts) or a "
                            f"list of conversations, got {type(messages).__name__}")
        if not messages:
            raise ValueError("messages is empty: give a conversation or a list of conversations")
        conversations = [messages] if _is_conversation(messages) else list(messages)
        if not isinstance(add_generation_prompt, (bool, type(None))):
            raise TypeError(f"add_generation_prompt must be a bool, got {type(add_generation_prompt).__name__} (the "
                            "fourth positional argument is add_generation_prompt here; pass lora_request by keyword)")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message, so add_generation_prompt cannot "
                             "also be true")
        generation_prompt = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        template_kwargs = _template_kwargs(tools, chat_template_kwargs)
        rendered = [self._render_chat(c, generation_prompt, chat_template, i, continue_final_message,
                                      template_kwargs) for i, c in enumerate(conversations)]
        texts = [text for text, _ in rendered]
        prompt_ids = [self.engine.tokenize(text, add_special_tokens=False) for text in texts]
        return self._run(prompt_ids, sampling_params, priority, use_tqdm, lora_request, prompt_texts=texts,
                         images=[images or None for _, images in rendered])

    def apply_chat_template(
        self, conversation: Conversation, add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template."""
        text, _ = self._render_chat(conversation, add_generation_prompt, chat_template)
        return self.engine.tokenize(text, add_special_tokens=False)

    def _render_chat(self, conversation: Conversation, add_generation_prompt: bool, chat_template: str | None,
                     index: int | None = None, continue_final_message: bool = False,
                     template_kwargs: dict[str, Any] | None = None) -> tuple[str, list]:
        """A conversation as the chat template renders it, and its images (``image_url`` / ``image_pil`` parts, in
        order; the text holds the model's image placeholder for each); ``ValueError`` for a conversation or
        template that cannot be rendered (``index``: the conversation's place in a list, for the message;
        ``template_kwargs``: further variables for the template, as ``_template_kwargs`` makes them)."""
        where = "" if index is None else f"conversation {index}: "
        tokenizer = self.engine.tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
        if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)):
            raise TypeError(f"{where}a conversation must be a list of messages, got {type(conversation).__name__}")
        if not conversation:
            raise ValueError(f"{where}the conversation has no messages")
        for i, message in enumerate(conversation):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"{where}message {i} must be a dict with 'role' and 'content', got {message!r}")
        conversation = [_message_for_template(m, f"{where}message {i}") for i, m in enumerate(conversation)]
        try:
            conversation, images = self.engine.input.conversation_images(conversation, chat_template)
        except ValueError as exc:
            raise InvalidRequestError(f"{where}{exc}", "messages") from None
        if continue_final_message and conversation[-1].get("role") != "assistant":
            raise ValueError(f"{where}continue_final_message needs the last message to be the assistant's")
        extra = dict(template_kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template, **extra)
            return text, images
        except (TemplateError, TypeError) as exc:  # a template that does not parse, refuses these messages, or
            # meets a value it cannot handle (a TypeError raised inside the template)
            raise ValueError(f"{where}the chat template cannot render this conversation: "
                             f"{type(exc).__name__}: {exc}") from None

    # ---- the loop ----------------------------------------------------------------------------------------

    def _run(self, prompts, sampling_params, priority, use_tqdm, lora_request=None,
             prompt_texts: list[str] | None = None, cache_salts: list[str | None] | None = None,
             images: list[list | None] | None = None,
             embeds: list[torch.Tensor | None] | None = None) -> list[RequestOutput]:
        n = len(prompts)
        loras = _lora_refs(lora_request, n)
        if isinstance(sampling_params, Sequence) and not isinstance(sampling_params, (str, bytes)):
            params_list = list(sampling_params)
            if len(params_list) != n:
                raise ValueError(f"got {len(params_list)} sampling_params for {n} prompts")
        else:
            params_list = [sampling_params or self.engine.default_sampling_params()] * n
        for i, params in enumerate(params_list):
            if not isinstance(params, SamplingParams):
                where = "sampling_params" if len(params_list) == 1 else f"sampling_params[{i}]"
                raise TypeError(f"{where} must be a SamplingParams (one for all prompts, or a list with one per "
                                f"prompt), got {type(params).__name__}")
        _check_priority(priority, n)
        engine = self.engine
        base = f"llm-{time.monotonic_ns()}-"
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                ids.append(engine.add_request(base + str(i), prompt, params, priority[i] if priority else 0,
                                              lora=loras[i], prompt_text=prompt_texts[i] if prompt_texts else None,
                                              cache_salt=cache_salts[i] if cache_salts else None,
                                              images=images[i] if images else None,
                                              prompt_embeds=embeds[i] if embeds else None))
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return self._collect(ids, use_tqdm, "Processed prompts")

    def _collect(self, ids: list[str], use_tqdm: ProgressBar, desc: str) -> list:
        """Step the engine until the requests ``ids`` finish; their outputs in ``ids``' order. ``use_tqdm``: whether
        to show a progress bar, or the factory that makes it."""
        engine = self.engine
        results: dict[str, RequestOutput | EmbeddingRequestOutput] = {}
        if callable(use_tqdm):
            bar = use_tqdm(total=len(ids), desc=desc, dynamic_ncols=True)
        else:
            bar = tqdm(total=len(ids), desc=desc, dynamic_ncols=True, disable=not use_tqdm)
        start = time.perf_counter()
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
                        if isinstance(output, RequestOutput):
                            out_tokens += sum(len(o.token_ids) for o in output.outputs)
                            bar.set_postfix_str(f"output {out_tokens / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[request_id] for request_id in ids]


def _check_priority(priority: Any, n: int) -> None:
    """``priority`` must be None or one integer per prompt. Passed positionally as vLLM orders ``generate``'s
    arguments (``use_tqdm`` third), a bool or a ``SamplingParams`` lands here: the message says so."""
    if priority is None:
        return
    if not isinstance(priority, Sequence) or isinstance(priority, (str, bytes)):
        raise TypeError(f"priority must be a list of integers, one per prompt, got {type(priority).__name__} (the "
                        "third positional argument is priority here; pass use_tqdm and lora_request by keyword)")
    if len(priority) != n:
        raise ValueError(f"got {len(priority)} priorities for {n} prompts")


def _lora_refs(lora_request, n: int) -> list[LoraRef | None]:
    """One adapter reference (or None) per prompt from ``generate``'s ``lora_request``."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [None if lora_request is None else lora_request.to_ref()] * n
    if not isinstance(lora_request, Sequence) or isinstance(lora_request, str):
        raise TypeError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")
    if len(lora_request) != n:
        raise ValueError(f"got {len(lora_request)} lora_request entries for {n} prompts")
    for i, item in enumerate(lora_request):
        if item is not None and not isinstance(item, LoRARequest):
            raise TypeError(f"lora_request[{i}] must be a LoRARequest or None, got {type(item).__name__}")
    return [None if item is None else item.to_ref() for item in lora_request]


def _template_kwargs(tools: list[dict[str, Any]] | None,
                     chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The extra keyword arguments ``chat`` passes to ``apply_chat_template``: ``tools`` and the user's template
    variables. A variable that ``chat`` sets through its own argument is refused, naming that argument."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise TypeError(f"tools must be a list of tool definitions (dicts), got {type(tools).__name__}")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    kwargs = dict(chat_template_kwargs or {})
    if (error := template_kwargs_error(kwargs)) is not None:
        raise ValueError(error)
    if tools is not None:
        kwargs["tools"] = tools
    return kwargs


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _prompt_items(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    """``prompts`` (one prompt, or a list of them) as a list of prompts as given."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise TypeError("prompts must be a string, a list of token ids, a prompt dict, or a list of those, got "
                        f"{type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput], salted: bool = False) -> list[Prompt | None]:
    """``generate``'s and ``embed``'s ``prompts`` as a list of prompts, each a string or a list of token ids
    (``salted``: a prompt dict may carry a ``cache_salt`` and ``multi_modal_data``, which :func:`_cache_salts` and
    :func:`_prompt_images` read)."""
    return [_as_prompt(p, i, salted) for i, p in enumerate(_prompt_items(prompts))]


def _cache_salts(prompts: PromptInput | Sequence[PromptInput]) -> list[str | None]:
    """Each prompt's ``cache_salt`` (None but in a prompt dict that has one), as ``_as_prompt_list`` lists them;
    ``ValueError`` for a salt that is not a non-empty string."""
    return [check_cache_salt(p.get("cache_salt")) if isinstance(p, dict) else None for p in _prompt_items(prompts)]


def _prompt_images(prompts: PromptInput | Sequence[PromptInput]) -> list[list | None]:
    """Each prompt's images (vLLM's ``multi_modal_data``: ``{"image": image or [images]}``; None where a prompt
    has none), as ``_as_prompt_list`` lists the prompts; ``ValueError`` for another modality or shape."""
    found: list[list | None] = []
    for index, prompt in enumerate(_prompt_items(prompts)):
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if data is None:
            found.append(None)
            continue
        if not isinstance(data, dict) or set(data) - {"image"}:
            others = sorted(set(data) - {"image"}) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"prompt {index}: multi_modal_data takes images only ({{'image': image or [images]}}), "
                             f"got {others}")
        images = data.get("image")
        found.append(list(images) if isinstance(images, (list, tuple)) else [images] if images is not None else None)
    return found


def _prompt_embeds(prompts: PromptInput | Sequence[PromptInput]) -> list[torch.Tensor | None]:
    """Each prompt's ``prompt_embeds`` (vLLM's ``EmbedsPrompt``; None where a prompt is text or token ids), as
    ``_as_prompt_list`` lists the prompts (it refuses a dict that has them beside a text or token ids)."""
    return [p.get("prompt_embeds") if isinstance(p, dict) else None for p in _prompt_items(prompts)]


_PROMPT_KEYS = {"prompt": str, "prompt_token_ids": list}


def _as_prompt(prompt: PromptInput, index: int, salted: bool = False) -> Prompt | None:
    """One prompt as a string or a list of token ids: a ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``
    dict is unwrapped; anything else but a string or a list raises (``index``: its place, for the message;
    ``salted``: the dict may also hold a ``cache_salt`` and ``multi_modal_data``, or be ``{"prompt_embeds":
    tensor}``, which is None here: :func:`_prompt_embeds` reads it)."""
    if isinstance(prompt, (str, list)):
        return prompt
    if not isinstance(prompt, dict):
        raise ValueError(f"prompt {index} must be a string, a list of token ids or a prompt dict, got "
                         f"{type(prompt).__name__}")
    given = [k for k in _PROMPT_KEYS if k in prompt]
    if salted and "prompt_embeds" in prompt:
        extra = sorted(str(k) for k in prompt if k not in ("prompt_embeds", "cache_salt"))
        if extra:
            raise ValueError(f"prompt {index}: a prompt given as embeddings ({{'prompt_embeds': tensor}}) takes only "
                             f"a cache_salt besides, got {', '.join(extra)}")
        return None
    others = sorted(str(k) for k in prompt
                    if k not in _PROMPT_KEYS and not (salted and k in ("cache_salt", "multi_modal_data")))
    if others:
        raise ValueError(f"prompt {index}: unsupported prompt dict key(s) {', '.join(others)} (Inferneo takes text "
                         "prompts only: {'prompt': text} or {'prompt_token_ids': ids})")
    if len(given) != 1:
        raise ValueError(f"prompt {index}: a prompt dict needs exactly one of 'prompt' (text) or "
                         f"'prompt_token_ids', got {given or 'neither'}")
    value = prompt[given[0]]
    if not isinstance(value, _PROMPT_KEYS[given[0]]):
        expected = "a string" if given[0] == "prompt" else "a list of token ids"
        raise ValueError(f"prompt {index}: '{given[0]}' must be {expected}, got {type(value).__name__}")
    return value


def _message_for_template(message: dict, at: str) -> dict:
    """``message`` as the server hands it to the chat template (vLLM does the same, offline and served): OpenAI
    text content parts (``[{"type": "text", "text": ...}, ...]``) joined by newlines, since templates expect a
    string; an assistant message's null content beside its ``tool_calls`` as the empty string; and each tool call's
    ``arguments``, when a JSON string of an object, decoded into that object, which is what templates read. Image
    parts (``image_url``, or vLLM's ``image_pil``) leave ``IMAGE_MARK`` in the text and their images in the
    message's ``images`` (``multimodal.chat.take_images`` reads them); other parts (audio) raise ``ValueError``."""
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        message = {**message, "content": ""}
    elif isinstance(content, list):
        texts, images = [], []
        for part in content:
            if is_image_part(part):
                images.append(image_part_url(part, at))
                texts.append(IMAGE_MARK)
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{at}: only text and image content parts are supported, got {part!r:.80}")
            texts.append(part["text"])
        message = {**message, "content": "\n".join(texts)}
        if images:
            message[IMAGES_KEY] = images
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        message = {**message, "tool_calls": [_arguments_decoded(call) for call in calls]}
    return message


def _arguments_decoded(call: Any) -> Any:
    """A tool call with its ``function.arguments`` decoded when they are a JSON string of an object; anything else
    (already an object, not JSON, not a call of that shape) unchanged."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    return {**call, "function": {**function, "arguments": object_or_text(function["arguments"])}}
