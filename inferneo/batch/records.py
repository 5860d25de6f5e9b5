"""The OpenAI batch file format: reading input lines and building output records.

An input line is ``{"custom_id": str, "method": "POST", "url": URL, "body": {...}}`` with ``URL`` one of
:data:`SUPPORTED_URLS`: OpenAI's batch endpoints (completions, chat completions, Responses, embeddings) and vLLM's
(scores, reranks, classes), each body as that endpoint takes it. An output record is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``; ``error`` is ``{"code", "message"}`` for a line that failed (an invalid line, or a request the
server refused) and ``null`` otherwise.

Record ids are deterministic: ``batch_req_<input digest>_<line number>``. A rerun finds the lines already done
from them, and an output file whose ids carry another digest belongs to another input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SUPPORTED_URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/score",
                  "/v1/rerank", "/v2/rerank", "/classify")
DIGEST_CHARS = 16
_RECORD_ID = re.compile(r"^batch_req_([0-9a-f]{16})_([1-9][0-9]*)$")


@dataclass(slots=True)
class BatchRequest:
    """A valid input line: one request to send."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class InvalidLine:
    """An input line that cannot be sent; it becomes an error record."""

    line: int
    custom_id: str | None
    code: str
    message: str


def parse_line(line: int, raw: bytes, seen_ids: set[str]) -> BatchRequest | InvalidLine:
    """Check one non-blank input line. ``seen_ids`` holds the custom_ids of earlier lines and is updated: the
    first line with a custom_id owns it, later ones are refused as duplicates."""
    if line == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors put first
    raw = raw.rstrip(b"\r\n")  # so that an error's position is within this line, not on "line 2" after it
    try:
        item = json.loads(raw)
    except UnicodeDecodeError:
        return InvalidLine(line, None, "invalid_json", f"line {line} is not valid UTF-8")
    except json.JSONDecodeError as exc:
        return InvalidLine(line, None, "invalid_json",
                           f"line {line} is not valid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return InvalidLine(line, None, "invalid_json", f"line {line} nests arrays or objects too deeply to read")
    if not isinstance(item, dict):
        return InvalidLine(line, None, "invalid_request", f"line {line} must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return InvalidLine(line, None, "missing_custom_id",
                           f"line {line} needs a non-empty string 'custom_id'")
    if custom_id in seen_ids:
        return InvalidLine(line, custom_id, "duplicate_custom_id",
                           f"line {line}: custom_id {custom_id!r} was already used by an earlier line")
    seen_ids.add(custom_id)
    extra = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if extra:
        return InvalidLine(line, custom_id, "invalid_request", f"line {line}: unknown field(s) {', '.join(extra)}")
    method = item.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        return InvalidLine(line, custom_id, "invalid_method", f"line {line}: method must be POST, got {method!r}")
    url = item.get("url")
    if url not in SUPPORTED_URLS:
        return InvalidLine(line, custom_id, "invalid_url",
                           f"line {line}: url must be one of {', '.join(SUPPORTED_URLS)}, got {url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        return InvalidLine(line, custom_id, "invalid_body", f"line {line}: 'body' must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False, allow_nan=False).encode()  # what the request will carry
    except UnicodeEncodeError:
        return InvalidLine(line, custom_id, "invalid_body",
                           f"line {line}: 'body' holds a lone surrogate escape (\\ud800 to \\udfff without its "
                           "pair), which is not valid Unicode and cannot be sent")
    except ValueError:
        return InvalidLine(line, custom_id, "invalid_body",
                           f"line {line}: 'body' holds NaN or Infinity (or a number too large for a float), "
                           "which JSON does not allow")
    if body.get("stream"):
        return InvalidLine(line, custom_id, "invalid_body",
                           f"line {line}: stream is not supported in a batch (each response is written whole)")
    return BatchRequest(line, custom_id, url, body)


def record_id(digest: str, line: int) -> str:
    """The id of the record for input line ``line`` of the input whose digest is ``digest``."""
    return f"batch_req_{digest[:DIGEST_CHARS]}_{line}"


def parse_record_id(value: Any) -> tuple[str, int] | None:
    """``(digest, line)`` from a record id, or None for an id this format did not write."""
    match = _RECORD_ID.match(value) if isinstance(value, str) else None
    return (match.group(1), int(match.group(2))) if match else None


def response_record(digest: str, line: int, custom_id: str, status_code: int, request_id: str | None,
                    body: Any) -> dict[str, Any]:
    """The record of a request the server answered. A non-2xx answer also fills ``error`` from the body's
    OpenAI error object, so that ``error is not None`` tells every failed line."""
    error = None
    if not 200 <= status_code < 300:
        detail = body.get("error") if isinstance(body, dict) else None
        if isinstance(detail, dict):
            code = detail.get("code") or detail.get("type") or f"http_{status_code}"
            message = str(detail.get("message", ""))
        else:
            code, message = f"http_{status_code}", str(body)[:1000]
        error = {"code": str(code), "message": message}
    return {"id": record_id(digest, line), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": error}


def error_record(digest: str, line: int, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """The record of a line that got no answer from the server (invalid, or the request could not be made)."""
    return {"id": record_id(digest, line), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
