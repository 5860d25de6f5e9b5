"""Structured output in batch files: input lines whose ``response_format`` comes from a pydantic model (or a JSON
schema), and output records read back as instances of it.

``inferneo batch`` sends each line's ``body`` as it is, so ``response_format``, ``structured_outputs``,
``tools`` and ``tool_choice`` written in a line reach the server unchanged, and each record keeps the server's
whole answer (``tool_calls`` included). These helpers only save writing schemas and parsing answers by hand::

    with open("requests.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(request_line(f"doc-{i}", {"messages": [{"role": "user", "content": text}], "max_tokens": 200},
                                 response_format=Invoice))
    # inferneo batch --url http://localhost:8000 requests.jsonl results.jsonl
    for result in read_results("results.jsonl", Invoice):
        print(result.custom_id, result.parsed if result.ok else result.error)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from inferneo.client.errors import StructuredOutputError
from inferneo.client.structured import OutputFormat, ResponseFormatInput, parse_choice, split_tools
from inferneo.client.types import ChatCompletion, Completion

__all__ = ["ParsedRecord", "read_results", "request_line"]


def request_line(custom_id: str, body: Mapping[str, Any], *, response_format: ResponseFormatInput | None = None,
                 tools: Sequence[dict[str, Any] | type[BaseModel]] | None = None, url: str | None = None) -> str:
    """One input line (JSON and its newline) for ``inferneo batch``: ``body`` with ``response_format`` (a pydantic
    model, another type, a JSON schema or a wire ``response_format``) and ``tools`` (dicts or pydantic models) in
    their wire forms. ``url`` defaults to ``/v1/chat/completions`` for a body with ``messages`` and to
    ``/v1/completions`` otherwise."""
    wire = dict(body)
    if response_format is not None:
        wire["response_format"] = OutputFormat.of(response_format).response_format
    if tools is not None:
        wire["tools"] = split_tools(tools)[0]
    if url is None:
        url = "/v1/chat/completions" if "messages" in wire else "/v1/completions"
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": wire}
    return json.dumps(line, ensure_ascii=False) + "\n"


@dataclass(slots=True)
class ParsedRecord:
    """One output record: the server's ``response`` body (a ``ChatCompletion`` or ``Completion``; ``None`` when
    the line got no answer) and, with a format, ``parsed_choices``. ``error`` is the record's error
    (``{"code", "message"}``) or a :class:`~inferneo.client.errors.StructuredOutputError` for an answer that
    does not validate."""

    custom_id: str | None
    response: ChatCompletion | Completion | None
    error: dict[str, Any] | StructuredOutputError | None = None
    parsed_choices: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the line was answered (and its answers validate)."""
        return self.error is None

    @property
    def parsed(self) -> Any:
        """The first choice's parsed answer (``None`` without a format, or for a failed line)."""
        return self.parsed_choices[0] if self.parsed_choices else None


def read_results(path: str | os.PathLike[str], response_format: ResponseFormatInput | None = None
                 ) -> Iterator[ParsedRecord]:
    """The records of an ``inferneo batch`` output file, in file order, each answer read into
    ``response_format``'s type when it is given."""
    fmt = None if response_format is None else OutputFormat.of(response_format)
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if raw.strip():
                yield _result(json.loads(raw), fmt)


def _result(record: dict[str, Any], fmt: OutputFormat | None) -> ParsedRecord:
    custom_id = record.get("custom_id")
    reply = record.get("response") or {}
    body = reply.get("body")
    if record.get("error") is not None or not isinstance(body, dict):
        return ParsedRecord(custom_id, None, record.get("error") or {"code": "no_response", "message": str(body)})
    response = (ChatCompletion if body.get("object") == "chat.completion" else Completion).model_validate(body)
    if fmt is None:
        return ParsedRecord(custom_id, response)
    try:
        parsed = [parse_choice(fmt, choice) for choice in response.choices]
    except StructuredOutputError as exc:
        return ParsedRecord(custom_id, response, exc)
    return ParsedRecord(custom_id, response, parsed_choices=parsed)
