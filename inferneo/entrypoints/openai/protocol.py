"""Request bodies of the OpenAI wire format, with Inferneo's additive extensions, and small response helpers.

Types are strict, as the OpenAI API's are: no coercion between strings, numbers and booleans (``"stream": "yes"``,
``"n": "2"``, ``"max_tokens": 2.0`` and ``"temperature": true`` are refused); an integer is a valid number for a
float field (``"temperature": 1``). Unknown fields are refused (400 naming the field), as the OpenAI API does;
fields the API defines that change nothing here (``user``, ``metadata``, ...) are accepted, checked and ignored.

Every string and list a client can send has a cap (the ``MAX_*`` constants below, documented in
``docs/reliability.md``); a value past it is refused with 400 naming the field. The caps sit far above what a real
request needs: the body-size limit of the guards (``guards.py``, 4 MiB by default) is met first by anything but
the short fields. The number of prompts or conversations in one request, ``n`` and the JSON nesting depth are
limited by the guards, whose limits a server's flags set. Responses are plain dicts built by the serving modules:
the hot streaming path serializes them directly.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from inferneo.entrypoints.chat_template_kwargs import template_kwargs_error
from inferneo.json_text import object_or_text
from inferneo.multimodal.chat import IMAGE_MARK, IMAGES_KEY, image_part_url

Conversation = list[dict[str, Any]]

# Roles a chat message may have: OpenAI's, plus "ipython" (the tool role of Llama 3.1 templates).
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# Keys a chat message may carry: OpenAI's (what its client sends back when a previous answer is appended to the
# conversation), plus ``reasoning`` and ``reasoning_content``, which reasoning-model servers return (an assistant
# message's thinking goes to the chat template as ``reasoning_content``). Others are refused.
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal",
                          "annotations", "audio", "reasoning", "reasoning_content"})

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
"""The largest token id a list of stop token ids may hold (no vocabulary comes near it)."""

MAX_TEXT_CHARS = 2**24
"""Characters in one prompt string, one message's content (text parts joined), ``suffix`` and a ``/tokenize``
prompt: 16,777,216, about four million tokens, past every context length; a 4 MiB body holds less anyway."""
MAX_TOKEN_IDS = 2**22
"""Token ids in one prompt given as ids, and in ``/detokenize``'s ``tokens``: 4,194,304."""
MAX_PROMPT_EMBEDS = 256
"""Prompts given as embeddings (``prompt_embeds``) in one completions request; with the text prompts they also
count against ``--max-prompts-per-request``."""
MAX_MESSAGES = 16384
"""Messages in one conversation."""
MAX_CONTENT_PARTS = 4096
"""Content parts in one message."""
MAX_STOP_STRINGS = 64
"""Strings in ``stop`` (OpenAI takes 4)."""
MAX_STOP_CHARS = 1024
"""Characters in one stop string."""
MAX_STOP_TOKEN_IDS = 1024
"""Ids in ``stop_token_ids``."""
MAX_LOGIT_BIAS = 1024
"""Entries in ``logit_bias``."""
MAX_ALLOWED_TOKEN_IDS = 1 << 18
"""Entries in ``allowed_token_ids`` (more than any vocabulary served)."""
MAX_MODEL_CHARS = 4096
"""Characters in ``model`` (a served name may be a local path: PATH_MAX is 4096)."""
MAX_ID_CHARS = 256
"""Characters in the short identifiers: ``user``, a message's ``name`` and ``tool_call_id``, ``service_tier``,
``tool_choice`` and ``function_call`` given as strings, and the keys of ``chat_template_kwargs``."""
MAX_TOOLS = 128
"""Entries in ``tools`` and in ``functions`` (OpenAI's own bound; ``functions``, the deprecated form, is refused
once checked: use ``tools``), and tool calls in one assistant message."""
MAX_FUNCTION_NAME_CHARS = 64
"""Characters in a function's name (OpenAI's rule: letters, digits, ``_`` and ``-``; Inferneo also takes ``.``)."""
MAX_GRAMMAR_CHARS = 2**20
"""Characters in a regular expression or a grammar (``structured_outputs.regex`` / ``.grammar`` and their
``guided_*`` twins): 1,048,576."""
MAX_CHOICES = 4096
"""Strings in ``structured_outputs.choice`` (``guided_choice``), each at most ``MAX_STOP_CHARS`` characters."""
MAX_METADATA_PAIRS = 16
"""Pairs in ``metadata``, whose keys are strings of at most ``MAX_METADATA_KEY_CHARS`` characters and values
strings of at most ``MAX_METADATA_VALUE_CHARS``: OpenAI's rules."""
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_TEMPLATE_KWARGS = 64
"""Entries in ``chat_template_kwargs`` (the values are any JSON, bounded by the body size and nesting depth)."""

_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: a token id written in decimal digits


class _Body(BaseModel):
    # strict: no coercion between strings, numbers and booleans (an int is still a valid float). NaN and infinities
    # are valid Python JSON but no valid sampling setting.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the totals (every other chunk has ``usage:
    null``); ``continuous_usage_stats`` (vLLM's extension, with ``include_usage``) gives every chunk the usage so
    far instead of null."""

    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI pads its chunks against side channels; nothing to do here
    continuous_usage_stats: bool | None = False

    @model_validator(mode="after")
    def _continuous_needs_usage(self) -> StreamOptions:
        if self.continuous_usage_stats and not self.include_usage:
            raise ValueError("continuous_usage_stats puts the usage so far in every chunk, which needs "
                             "include_usage: true as well")
        return self


FunctionName = Annotated[str, Field(min_length=1, max_length=MAX_FUNCTION_NAME_CHARS, pattern=r"^[A-Za-z0-9_.-]+$")]
"""A function's (or a JSON schema's) name: OpenAI's rule, plus ``.``."""
SchemaValue = Annotated[str | dict[str, Any] | None, BeforeValidator(lambda v: _schema_value(v))]
"""A JSON schema field: an object, or a string holding one (vLLM takes both)."""
Choices = Annotated[list[str] | None, AfterValidator(lambda v: _check_choices(v))]
"""A list of choices: non-empty strings, at most ``MAX_CHOICES`` of them."""


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``: the schema the answer must follow, with OpenAI's name for it."""

    model_config = ConfigDict(populate_by_name=True)

    name: FunctionName
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (the object ``json_schema`` describes; its ``schema`` is required)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_goes_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'type' 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"'json_schema' goes only with 'type' 'json_schema', not {self.type!r}")
        return self


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` request field: exactly one of ``json`` (a schema, as an object or a JSON
    string), ``regex``, ``choice``, ``grammar`` (GBNF / EBNF, or Lark), ``json_object`` or ``structural_tag``, with
    vLLM's options (``StructuredOutputsParams`` says what each does)."""

    model_config = ConfigDict(populate_by_name=True)

    json_: SchemaValue = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: Choices = None
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None
    structural_tag: SchemaValue = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    disable_additional_properties: bool = False
    disable_fallback: bool = False

    def fields(self) -> dict[str, Any]:
        """The constraint as ``StructuredOutputsParams`` keyword arguments (only those given)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class FunctionDefinition(_Body):
    """A function the model may call: ``tools[i].function``."""

    name: FunctionName
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    """One entry of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDefinition


def _check_truncation(value: int | None, minus_one: str) -> int | None:
    """``truncate_prompt_tokens``: None, -1 (``minus_one`` says what it keeps) or at least 1."""
    if value == 0:
        raise ValueError(f"must be at least 1 (the tokens to keep), or -1 ({minus_one})")
    return value


class _SamplingBody(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)  # null (which OpenAI allows) means the default, 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    # Inferneo extensions (vLLM names them the same way).
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    # vLLM's: the request's prefix-cache blocks serve only requests with the same salt (one tenant's prompts cannot
    # be probed through another's cache hits)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    # keep only the prompt's last this many tokens (-1: as many as leave room for the answer)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)
    # vLLM's beam search: n is the beam width, length_penalty its ranking's exponent (inferneo.beam_search)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's: each choice also carries its generated token ids (token_ids) and its prompt's (prompt_token_ids)
    return_token_ids: bool | None = None
    # vLLM's: log-probabilities name their tokens "token_id:N" (None: the server's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: bool | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: SchemaValue = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: Choices = None
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    structural_tag: SchemaValue = None  # vLLM 0.8's spelling of structured_outputs.structural_tag
    # vLLM's older options of the constraint: the JSON whitespace, and the backend ("auto", "xgrammar",
    # "guidance"; vLLM's ":disable-any-whitespace" / ":disable-additional-properties" / ":no-fallback" after it)
    guided_whitespace_pattern: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    guided_decoding_backend: str | None = Field(None, max_length=200)

    @field_validator("n", mode="before")
    @classmethod
    def _null_n_is_one(cls, value: Any) -> Any:
        return 1 if value is None else value

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        strings = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("must be a string or a list of strings")
        _cap(len(strings), MAX_STOP_STRINGS, "stop strings")
        _cap(max((len(s) for s in strings), default=0), MAX_STOP_CHARS, "characters in a stop string")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncation(cls, value: int | None) -> int | None:
        return _check_truncation(value, "as many as the context leaves room for")

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        return _token_id_list(value, MAX_STOP_TOKEN_IDS, "stop token ids")

    @field_validator("allowed_token_ids")
    @classmethod
    def _check_allowed_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError("must not be empty (leave it out to allow every token)")
        return _token_id_list(value, MAX_ALLOWED_TOKEN_IDS, "allowed token ids")

    @field_validator("bad_words")
    @classmethod
    def _check_bad_words(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            _cap(len(value), MAX_STOP_STRINGS, "bad words")
            _cap(max((len(w) for w in value), default=0), MAX_STOP_CHARS, "characters in a bad word")
            if any(not w.strip() for w in value):
                raise ValueError("bad words must not be blank")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            _cap(len(value), MAX_LOGIT_BIAS, "entries")
            for key in value:
                if not _TOKEN_ID_KEY.fullmatch(key):
                    raise ValueError(f"keys must be token ids written in decimal digits, got {key[:40]!r}")
        return value


class CompletionRequest(_SamplingBody):
    """``POST /v1/completions``."""

    # vLLM's extension (with --enable-prompt-embeds): prompts given as embeddings, each a base64 ``torch.save`` of
    # a [num_tokens, hidden_size] tensor; they run before the text prompts, as vLLM orders them. Declared before
    # ``prompt``, whose check reads it: with embeddings the prompt may be left out, null or "".
    prompt_embeds: str | list[str] | None = None
    prompt: Any = Field(None, validate_default=True)
    # 0 only with echo (or prompt_logprobs): the prompt is scored, nothing is generated (OpenAI's legacy use).
    max_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    # vLLM's extension: every prompt token's log-probability with this many alternatives, in ``prompt_logprobs``
    # of each choice (not with stream).
    prompt_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    best_of: int | None = Field(None, ge=1, le=INT64_MAX)
    suffix: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    @field_validator("prompt_embeds", mode="before")
    @classmethod
    def _check_prompt_embeds(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
            raise ValueError("must be a base64 string (a torch.save'd tensor) or a list of them")
        _cap(len(value), MAX_PROMPT_EMBEDS, "prompt embeddings")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any, info: ValidationInfo) -> Any:
        if (value is None or value == "") and info.data.get("prompt_embeds"):
            return None  # only embeddings (the OpenAI client sends prompt="" where it cannot send none)
        if value is None:
            raise ValueError("prompt is required (or, with --enable-prompt-embeds, prompt_embeds)")
        return _check_prompts(value, "prompt")

    def prompt_list(self) -> list[str | list[int]]:
        """The text and token-id prompts, one entry each: a string or a list of token ids (none when the request
        gives embeddings only)."""
        return [] if self.prompt is None else _prompt_list(self.prompt)

    def prompt_embeds_list(self) -> list[str]:
        """The prompts given as embeddings (base64 strings), one entry each; none when there are none."""
        if self.prompt_embeds is None:
            return []
        return [self.prompt_embeds] if isinstance(self.prompt_embeds, str) else list(self.prompt_embeds)


class PredictionContent(_Body):
    """``prediction``: OpenAI's predicted output, a speed hint for its service; checked, then ignored here."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, str):
            _cap(len(value), MAX_TEXT_CHARS, "characters")
        else:
            _cap(len(value), MAX_CONTENT_PARTS, "content parts")
        return value


class _ChatTemplateTurn(_Body):
    """How a conversation is rendered: the template's extra variables (``chat_template_kwargs``), and how the prompt
    ends: with a new assistant turn (``add_generation_prompt``), or inside the last message, which the answer
    continues (``continue_final_message``, vLLM's extension: an assistant prefix). The two cannot both be asked
    for, and continuing needs a conversation whose last message is the assistant's. Shared by the chat and
    tokenize bodies (``messages`` is theirs)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _cap(len(value), MAX_TEMPLATE_KWARGS, "entries")
            _cap(max((len(k) for k in value), default=0), MAX_ID_CHARS, "characters in a key")
            if (error := template_kwargs_error(value)) is not None:
                raise ValueError(error)
        return value

    @model_validator(mode="after")
    def _continue_or_answer(self) -> _ChatTemplateTurn:
        if not self.continue_final_message:
            return self
        if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            raise ValueError("continue_final_message continues the last message, so add_generation_prompt cannot "
                             "also be true; leave it out or set it to false")
        messages = self.messages or []
        conversations = messages if messages and all(isinstance(c, list) for c in messages) else [messages]
        for i, conversation in enumerate(conversations):
            last = conversation[-1] if conversation else None
            if not isinstance(last, dict) or last.get("role") != "assistant":
                where = f"conversation {i}: " if len(conversations) > 1 else ""
                raise ValueError(f"{where}continue_final_message needs the last message to be the assistant's (the "
                                 "text to continue)")
        return self

    def generation_prompt(self) -> bool:
        """Whether the template ends with a new assistant turn (not when the final message is continued)."""
        return self.add_generation_prompt and not self.continue_final_message


class ChatCompletionRequest(_SamplingBody, _ChatTemplateTurn):
    """``POST /v1/chat/completions``; ``messages`` may also be a list of conversations (an extension)."""

    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=MAX_ID_CHARS)
    # OpenAI fields for its own service or models, accepted so that current SDKs and frameworks can send them:
    # hints with nothing to do here (the prefix cache needs no key) are checked and ignored; reasoning_effort goes
    # to the chat template (gpt-oss's reads it), as in vLLM; output this server cannot make is refused.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = Field(None, max_length=MAX_ID_CHARS)
    prompt_cache_retention: str | None = Field(None, max_length=MAX_ID_CHARS)
    safety_identifier: str | None = Field(None, max_length=MAX_ID_CHARS)
    prediction: PredictionContent | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(None, max_length=2)
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Inferneo extensions (and add_generation_prompt, continue_final_message, chat_template_kwargs: _ChatTemplateTurn).
    # vLLM's: with a reasoning parser, false leaves the thinking out of the answer (it is still generated).
    include_reasoning: bool = True
    # vLLM's: every prompt token's log-probability with this many alternatives (the rendered conversation's tokens),
    # in the response's ``prompt_logprobs`` (and each choice's); not with stream.
    prompt_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)

    @field_validator("messages", mode="before")
    @classmethod
    def _check_messages(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list of messages, or a list of conversations")
        if all(isinstance(c, list) for c in value):
            return [_conversation(c, f"conversation {i}: ") for i, c in enumerate(value)]
        return _conversation(value, "")

    @field_validator("tool_choice", "function_call", mode="before")
    @classmethod
    def _check_choice(cls, value: Any) -> Any:
        if value is None or isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a string or an object")
        _cap(len(value), MAX_ID_CHARS, "characters")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in TOOL_CHOICES:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in TOOL_CHOICES)} or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if isinstance(value, dict):
            function = value.get("function")
            if (value.get("type") != "function" or set(value) != {"type", "function"}
                    or not isinstance(function, dict) or set(function) != {"name"}
                    or not isinstance(function["name"], str) or not function["name"]):
                raise ValueError("an object must be {'type': 'function', 'function': {'name': ...}}")
            _cap(len(function["name"]), MAX_FUNCTION_NAME_CHARS, "characters in the function name")
        return value

    @field_validator("tools")
    @classmethod
    def _check_tool_names(cls, value: list[ChatTool] | None) -> list[ChatTool] | None:
        seen: set[str] = set()
        for tool in value or ():
            if tool.function.name in seen:
                raise ValueError(f"two tools are named {tool.function.name!r}; names must be unique")
            seen.add(tool.function.name)
        return value

    def named_tool(self) -> str | None:
        """The function ``tool_choice`` names, or None when it is a string (or absent)."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    def tool_mode(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``: what ``tool_choice`` asks for (OpenAI's default is
        ``auto`` when tools are given, ``none`` otherwise)."""
        if isinstance(self.tool_choice, dict):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "audio" in value:
            raise ValueError("audio output is not supported by this server; ask for ['text']")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _not_offered(cls, value: dict[str, Any] | None, info: ValidationInfo) -> None:
        if value is not None:
            what = "audio output" if info.field_name == "audio" else "web search"
            raise ValueError(f"{what} is not available on this server; leave {info.field_name} out (or null)")
        return value

    def template_kwargs(self) -> dict[str, Any] | None:
        """``chat_template_kwargs``, with ``reasoning_effort`` added when given (unless the kwargs set it)."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    def conversations(self) -> list[Conversation]:
        if self.messages and isinstance(self.messages[0], list):
            return self.messages
        return [self.messages]


class _TruncatingBody(_Body):
    """A pooling request's ``truncate_prompt_tokens`` (vLLM's): cut each over-long input to this many tokens
    instead of refusing it (-1: to the most the model takes); ``InputProcessor.truncation_length`` says how."""

    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncation(cls, value: int | None) -> int | None:
        return _check_truncation(value, "as many as the model takes")


class _InputsBody(_TruncatingBody):
    """A pooling request over ``input``: a string, a list of strings, a list of token ids or a list of lists of
    token ids (OpenAI's four forms of ``/v1/embeddings``); none may be empty."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    input: Any
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # Inferneo extension, as in the other endpoints

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _check_prompts(value, "input")

    def input_list(self) -> list[str | list[int]]:
        """The inputs, one entry each: a string or a list of token ids."""
        return _prompt_list(self.input)


class EmbeddingRequest(_InputsBody):
    """``POST /v1/embeddings``."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT64_MAX)


class ClassificationRequest(_InputsBody):
    """``POST /classify`` (vLLM's; also ``/v1/classify``), ``input`` as ``/v1/embeddings`` takes it."""


class ScoreRequest(_TruncatingBody):
    """``POST /v1/score`` (vLLM's): ``text_1`` (a string, or a list) scored against ``text_2`` (a string or a
    list) by a cross-encoder: one text against each text of the other, or two lists of one length pairwise."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    text_1: Any
    text_2: Any
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # Inferneo extension, as in the other endpoints

    @field_validator("text_1", "text_2", mode="before")
    @classmethod
    def _check_texts(cls, value: str | list[str], info) -> str | list[str]:
        return _check_texts(value, info.field_name)


class RerankRequest(_TruncatingBody):
    """``POST /v1/rerank`` (and ``/v2/rerank``), Jina's and Cohere's shape as vLLM serves it: the ``documents``
    ranked by a cross-encoder's score against ``query``, best first, the first ``top_n`` of them (all by default)."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1, le=INT64_MAX)
    return_documents: bool = True
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)

    @field_validator("query", "documents")
    @classmethod
    def _check_texts(cls, value: str | list[str], info) -> str | list[str]:
        return _check_texts(value, info.field_name)


def _check_texts(value: str | list[str], what: str) -> str | list[str]:
    """A string or a non-empty list of strings, none of them empty or longer than ``MAX_TEXT_CHARS``."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("must be a string or a list of strings")
    if not texts:
        raise ValueError("must hold at least one text")
    for i, text in enumerate(texts):
        where = what if isinstance(value, str) else f"{what} {i}"
        if not text:
            raise ValueError(f"{where} is an empty string")
        _check_text(text, where)
    return value


class TokenizeRequest(_ChatTemplateTurn):
    """``POST /tokenize``: a ``prompt`` or a conversation in ``messages``."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)  # rendered as chat renders them

    @field_validator("messages", mode="before")
    @classmethod
    def _check_messages(cls, value: Any) -> Any:
        return None if value is None else _conversation(value, "")


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    tokens: list[int] = Field(max_length=MAX_TOKEN_IDS)


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """``metadata`` within OpenAI's caps (``MAX_METADATA_*``); a ``ValueError`` naming the one passed."""
    if value is not None:
        _cap(len(value), MAX_METADATA_PAIRS, "key-value pairs")
        for key, text in value.items():
            _cap(len(key), MAX_METADATA_KEY_CHARS, "characters in a key")
            _cap(len(text), MAX_METADATA_VALUE_CHARS, "characters in a value")
    return value


def _check_prompts(value: Any, what: str) -> Any:
    """A ``prompt`` (``input``) field: a string, a non-empty list of strings, a non-empty list of token ids or a
    non-empty list of non-empty lists of token ids; no string may be empty."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"the {what} is an empty string")
        _check_text(value, f"the {what}")
        return value
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            if not all(value):
                raise ValueError(f"{what} {[bool(p) for p in value].index(False)} is an empty string")
            for i, p in enumerate(value):
                _check_text(p, f"{what} {i}")
            return value
        if all(_is_token_id(t) for t in value):
            _check_ids(value, f"the {what}")
            return value
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
            for i, p in enumerate(value):
                _check_ids(p, f"{what} {i}")
            return value
    raise ValueError("must be a string, a non-empty list of strings, a list of token ids, "
                     "or a list of non-empty lists of token ids")


def _prompt_list(value: str | list) -> list[str | list[int]]:
    """A checked ``prompt`` (``input``) field as a list with one entry per prompt."""
    if isinstance(value, str):
        return [value]
    if all(_is_token_id(t) for t in value):
        return [list(value)]
    return list(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_id_list(value: list[int] | None, cap: int, what: str) -> list[int] | None:
    """``value`` unless it holds more than ``cap`` ids or an id outside ``[0, TOKEN_ID_MAX]``."""
    if value is not None:
        _cap(len(value), cap, what)
        if any(not 0 <= t <= TOKEN_ID_MAX for t in value):
            raise ValueError(f"token ids must be in [0, {TOKEN_ID_MAX}]")
    return value


def _cap(count: int, limit: int, what: str, where: str = "") -> None:
    if count > limit:
        raise ValueError(f"{where}at most {limit} {what}, got {count}")


def _check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed")


def _check_ids(ids: list[int], what: str) -> None:
    if len(ids) > MAX_TOKEN_IDS:
        raise ValueError(f"{what} has {len(ids)} token ids; at most {MAX_TOKEN_IDS} are allowed")


TOOL_CHOICES = ("none", "auto", "required")


def _schema_value(value: Any) -> Any:
    """A JSON schema field: an object, or a string holding one (vLLM takes both); the string is parsed later."""
    if value is not None and not isinstance(value, (str, dict)):
        raise ValueError("must be a JSON schema: an object, or a string holding one")
    if isinstance(value, str):
        _cap(len(value), MAX_GRAMMAR_CHARS, "characters")
    return value


def _check_choices(value: list[str] | None) -> list[str] | None:
    if value is not None:
        if not value:
            raise ValueError("must be a non-empty list of strings")
        _cap(len(value), MAX_CHOICES, "choices")
        _cap(max(len(c) for c in value), MAX_STOP_CHARS, "characters in a choice")
        if not all(value):
            raise ValueError(f"choice {value.index('')} is an empty string")
    return value


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object"}


def _optional(message: dict, key: str, kind: type, limit: int | None, at: str) -> None:
    """Check an optional message key the server ignores: null, or a ``kind`` of at most ``limit`` characters."""
    value = message.get(key)
    if value is None:
        return
    if not isinstance(value, kind):
        raise ValueError(f"{at}: '{key}' must be {_KIND_NAMES[kind]}")
    if limit is not None:
        _cap(len(value), limit, f"characters in '{key}'", f"{at}: ")


def _content(content: Any, role: str, at: str, has_tool_calls: bool = False,
             images: list[str] | None = None) -> str:
    """A message's content as text: a string, or text parts joined by newlines; an assistant message that carries
    tool calls may have none (null), which becomes the empty string, as vLLM renders it. A user message's
    ``image_url`` parts leave ``IMAGE_MARK`` in the text and their URLs in ``images``."""
    if content is None:
        if has_tool_calls:
            return ""
        raise ValueError(f"{at}: a {role!r} message needs 'content' (a string or a list of text parts); "
                         "null content goes only with an assistant message's tool_calls")
    if isinstance(content, list):
        if not content:
            raise ValueError(f"{at}: 'content' is an empty list; give a string or at least one text part")
        _cap(len(content), MAX_CONTENT_PARTS, "content parts", f"{at}: ")
        texts = []
        for part in content:
            if images is not None and isinstance(part, dict) and part.get("type") == "image_url":
                images.append(image_part_url(part, at))
                texts.append(IMAGE_MARK)
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{at}: only text{' and image_url' if images is not None else ''} content parts "
                                 "are supported")
            if len(part) != 2:
                extra = sorted(set(part) - {"type", "text"})[0]
                raise ValueError(f"{at}: unrecognized key {extra[:40]!r} in a text part")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"{at}: 'content' must be a string or a list of text parts")
    _check_text(content, f"{at}: 'content'")
    return content


def _conversation(messages: Any, where: str) -> Conversation:
    """Check one conversation and flatten OpenAI content parts into text."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}a conversation must be a non-empty list of messages")
    _cap(len(messages), MAX_MESSAGES, "messages in a conversation", where)
    result = []
    for i, message in enumerate(messages):
        at = f"{where}message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content'")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{at}: unrecognized key {unknown[0][:40]!r}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{at} needs a 'role' string")
        if role not in ROLES:
            raise ValueError(f"{at}: role {role[:40]!r} is not one of {', '.join(ROLES)}")
        if message.get("function_call"):
            raise ValueError(f"{at}: 'function_call' (the deprecated form of tool calling) is not supported; "
                             "send 'tool_calls'")
        _optional(message, "tool_calls", list, None, at)
        _optional(message, "function_call", dict, None, at)
        _optional(message, "name", str, MAX_ID_CHARS, at)
        _optional(message, "tool_call_id", str, MAX_ID_CHARS, at)
        _optional(message, "refusal", str, MAX_TEXT_CHARS, at)
        _optional(message, "reasoning_content", str, MAX_TEXT_CHARS, at)
        _optional(message, "reasoning", str, MAX_TEXT_CHARS, at)
        _optional(message, "annotations", list, None, at)
        _optional(message, "audio", dict, None, at)
        tool_calls = message.get("tool_calls") or None  # an empty list means none
        if tool_calls is not None and role != "assistant":
            raise ValueError(f"{at}: only an 'assistant' message may carry 'tool_calls'")
        if role == "tool" and not message.get("tool_call_id"):
            raise ValueError(f"{at}: a 'tool' message needs 'tool_call_id', the id of the call it answers")
        images: list[str] | None = [] if role == "user" else None
        entry: dict[str, Any] = {"role": role,
                                 "content": _content(message.get("content"), role, at, tool_calls is not None,
                                                     images)}
        if images:
            entry[IMAGES_KEY] = images
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        if tool_calls is not None:
            entry["tool_calls"] = _tool_calls(tool_calls, at)
        if role == "tool":
            entry["tool_call_id"] = message["tool_call_id"]
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if role == "assistant" and thinking:
            entry["reasoning_content"] = thinking
        result.append(entry)
    return result


def _tool_calls(calls: list[Any], at: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked, for the chat template: each
    ``{"id", "type": "function", "function": {"name", "arguments"}}`` with ``arguments`` (a JSON string on the
    wire) decoded into an object, which is what chat templates expect (a string that is no JSON object stays a
    string: the model wrote it, the client sends it back)."""
    _cap(len(calls), MAX_TOOLS, "tool calls", f"{at}: ")
    shape = "each tool call must be {'id': str, 'type': 'function', 'function': {'name': str, 'arguments': str}}"
    result = []
    for j, call in enumerate(calls):
        where = f"{at}: tool call {j}"
        if not isinstance(call, dict) or not set(call) <= {"id", "type", "function"}:
            raise ValueError(f"{where}: {shape}")
        function = call.get("function")
        if (not isinstance(call.get("id"), str) or call.get("type") != "function" or not isinstance(function, dict)
                or set(function) != {"name", "arguments"} or not isinstance(function["name"], str)
                or not function["name"] or not isinstance(function["arguments"], str)):
            raise ValueError(f"{where}: {shape}")
        _cap(len(call["id"]), MAX_ID_CHARS, "characters in 'id'", f"{where}: ")
        _cap(len(function["name"]), MAX_FUNCTION_NAME_CHARS, "characters in the function name", f"{where}: ")
        _check_text(function["arguments"], f"{where}: 'arguments'")
        result.append({"id": call["id"], "type": "function",
                       "function": {"name": function["name"], "arguments": object_or_text(function["arguments"])}})
    return result


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's ``usage``; ``completion_tokens_details.reasoning_tokens`` when a reasoning parser counted them."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return body
