"""A Python client for Inferneo's OpenAI-compatible server. It needs only httpx and pydantic: no torch, no engine::

    from inferneo.client import InferneoClient

    client = InferneoClient("http://localhost:8000")
    out = client.completions.create(model="my-model", prompt=["Hello", "Bonjour"], max_tokens=16)
    print([choice.text for choice in out.choices])
"""

from inferneo.client._client import AsyncInferneoClient, InferneoClient
from inferneo.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InferneoError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionUsage,
    Model,
    ModelList,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncInferneoClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "ConflictError",
    "InferneoClient",
    "InferneoError",
    "InternalServerError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "Stream",
    "UnprocessableEntityError",
]
