"""Dataset rows to OpenAI requests and replies back to rows (no Ray here: the Ray processors use it).

A row asks for one request in one of three ways, checked in this order:

- ``body``: an OpenAI request body (a dict, or its JSON text) sent as it is, structured-output fields
  (``response_format``, ``structured_outputs``, ``tools``, ``tool_choice``) included; ``url`` picks the route
  (default: chat completions for a body with ``messages``, completions otherwise);
- ``messages``: a conversation, sent to ``/v1/chat/completions``;
- ``prompt``: a string (or list of token ids), sent to ``/v1/completions``.

The processor's ``sampling`` defaults go under every body, and ``request_fields`` names the columns copied into
each body (per-row ``max_tokens``, ``temperature``, ``response_format``, ...), row values winning. Arrow fills a
key a row lacks with null, so ``None`` values of dict bodies and fields are dropped (give the body as JSON text
to keep it byte for byte). The answer adds ``generated_text``, ``finish_reason``, ``status_code``,
``request_id``, ``response`` (the whole reply body as JSON text) and ``error`` (``None`` or ``"code: message"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from inferneo.batch.records import SUPPORTED_URLS

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OUTPUT_COLUMNS = ("generated_text", "finish_reason", "status_code", "request_id", "response", "error")


class RowError(ValueError):
    """A row that does not describe a request; the row's ``error`` says why (it is not sent)."""


def request_of(row: Mapping[str, Any], sampling: Mapping[str, Any], request_fields: Iterable[str],
               model: str) -> tuple[str, dict[str, Any]]:
    """The route and body that ``row`` asks for (raises RowError naming the bad column)."""
    body: dict[str, Any] = {k: v for k, v in sampling.items() if v is not None}
    url = row.get("url")
    if _present(row.get("body")):
        given = row["body"]
        if isinstance(given, (str, bytes)):
            try:
                given = json.loads(given)
            except json.JSONDecodeError as exc:
                raise RowError(f"column 'body' is not valid JSON: {exc}") from None
        else:
            given = _dropped_nulls(given)
        if not isinstance(given, Mapping):
            raise RowError(f"column 'body' must be a JSON object, got {type(given).__name__}")
        body.update(given)
        url = url or (CHAT_URL if "messages" in body else COMPLETIONS_URL)
    elif _present(row.get("messages")):
        body["messages"] = _dropped_nulls(_plain(row["messages"]))
        url = url or CHAT_URL
    elif _present(row.get("prompt")):
        body["prompt"] = _plain(row["prompt"])
        url = url or COMPLETIONS_URL
    else:
        raise RowError("the row has none of the columns 'body', 'messages' or 'prompt'")
    if url not in SUPPORTED_URLS:
        raise RowError(f"column 'url' must be one of {', '.join(SUPPORTED_URLS)}, got {url!r}")
    for name in request_fields:
        value = _plain(row.get(name))
        if value is not None:
            body[name] = _dropped_nulls(value)
    if body.get("stream"):
        raise RowError("stream is not supported in a batch (each answer is returned whole)")
    body.setdefault("model", model)
    return url, body


def answer_of(status_code: int, request_id: str | None, reply: Any) -> dict[str, Any]:
    """The output columns for a reply (``reply`` is the parsed JSON body, or text)."""
    text = finish = error = None
    if 200 <= status_code < 300:  # embeddings, scores, ranks and classes have no text: they are in "response"
        if isinstance(reply, dict) and reply.get("choices"):
            choice = reply["choices"][0]
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            finish = choice.get("finish_reason")
        elif isinstance(reply, dict) and reply.get("object") == "response":
            text = "".join(part.get("text") or "" for item in reply.get("output") or ()
                           if item.get("type") == "message" for part in item.get("content") or ()
                           if part.get("type") == "output_text")
            finish = reply.get("status")
    else:
        detail = reply.get("error") if isinstance(reply, dict) else None
        if isinstance(detail, dict):
            error = f"{detail.get('code') or detail.get('type') or f'http_{status_code}'}: {detail.get('message')}"
        else:
            error = f"http_{status_code}: {str(reply)[:1000]}"
    return {"generated_text": text, "finish_reason": finish, "status_code": status_code, "request_id": request_id,
            "response": json.dumps(reply, ensure_ascii=False), "error": error}


def row_error(message: str) -> dict[str, Any]:
    """The output columns of a row that was not sent."""
    return {"generated_text": None, "finish_reason": None, "status_code": 400, "request_id": None,
            "response": None, "error": f"invalid_row: {message}"}


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return len(value) > 0
    except TypeError:
        return True


def _plain(value: Any) -> Any:
    """Python values from what Arrow / NumPy hand back (arrays of messages, token ids, ...)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _dropped_nulls(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, Mapping):
        return {k: _dropped_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_dropped_nulls(v) for v in value]
    return value
