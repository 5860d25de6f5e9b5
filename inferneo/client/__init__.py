"""A Python client for Inferneo's OpenAI-compatible server. It needs only httpx and pydantic: no torch, no engine::

    from inferneo.client import InferneoClient

    client = InferneoClient("http://localhost:8000")
    out = client.completions.create(model="my-model", prompt=["Hello", "Bonjour"], max_tokens=16)
    print([choice.text for choice in out.choices])

    class City(BaseModel):
        name: str
        country: str

    answer = client.chat.completions.parse(messages=[{"role": "user", "content": "A city?"}], response_format=City)
    print(answer.choices[0].message.parsed)   # City(name=..., country=...)
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
    LengthFinishReasonError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StructuredOutputError,
    UnprocessableEntityError,
    UnsendableRequestError,
)
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.structured import OutputFormat, function_tool
from inferneo.client.types import (
    Batch,
    BatchList,
    BatchRequestCounts,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionUsage,
    FileContent,
    FileDeleted,
    FileList,
    FileObject,
    Model,
    ModelList,
    ParsedChatCompletion,
    ParsedCompletion,
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
    "Batch",
    "BatchList",
    "BatchRequestCounts",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "ConflictError",
    "FileContent",
    "FileDeleted",
    "FileList",
    "FileObject",
    "InferneoClient",
    "InferneoError",
    "InternalServerError",
    "LengthFinishReasonError",
    "Model",
    "ModelList",
    "NotFoundError",
    "OutputFormat",
    "ParsedChatCompletion",
    "ParsedCompletion",
    "PermissionDeniedError",
    "RateLimitError",
    "Stream",
    "StructuredOutputError",
    "UnprocessableEntityError",
    "UnsendableRequestError",
    "function_tool",
]
