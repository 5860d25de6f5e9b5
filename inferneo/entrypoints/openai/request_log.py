"""What ``--log-requests`` writes of a request body under ``--max-log-len N`` (vLLM's flag): its prompts cut to N
characters each, and its token-id prompts to N ids, the rest of the body as sent."""

from __future__ import annotations

import json
from typing import Any

# The fields that carry prompts, by endpoint (the chat ones: messages, whose "content" and "text" values are cut;
# Anthropic's: system and messages).
PROMPT_FIELDS = ("prompt", "input", "text_1", "text_2", "query", "documents", "instructions", "system")
_MESSAGE_TEXT_KEYS = ("content", "text")


def shorten_prompts(body: str, max_len: int) -> str:
    """``body`` (a request's JSON) with every prompt string cut to ``max_len`` characters and every token-id list
    to ``max_len`` ids; a body that is no JSON object comes back as it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    for name in PROMPT_FIELDS:
        if name in data:
            data[name] = _cut(data[name], max_len)
    if "messages" in data:
        data["messages"] = _cut_messages(data["messages"], max_len)
    return json.dumps(data, ensure_ascii=False)


def _cut(value: Any, max_len: int) -> Any:
    if isinstance(value, str):
        return value[:max_len]
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value[:max_len]  # token ids
        return [_cut(v, max_len) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, max_len) for k, v in value.items()}
    return value


def _cut_messages(value: Any, max_len: int) -> Any:
    """Messages (or lists of conversations) with the text of each message's content and text parts cut."""
    if isinstance(value, list):
        return [_cut_messages(v, max_len) for v in value]
    if isinstance(value, dict):
        return {
            k: (_cut(v, max_len) if k in _MESSAGE_TEXT_KEYS else _cut_messages(v, max_len))
            for k, v in value.items()
        }
    return value
