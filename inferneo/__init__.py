"""Inferneo: continuous-batching LLM inference, offline and behind an OpenAI-compatible server.

``LLM`` (the offline engine, which needs the ``engine`` extra) and the HTTP client (``InferneoClient``,
``AsyncInferneoClient`` and its exceptions, which need only httpx and pydantic) are imported on first use, so
``import inferneo`` stays light.
"""

from inferneo.beam_search import BeamSearchOutput, BeamSearchParams
from inferneo.outputs import CompletionOutput, Logprob, RequestOutput
from inferneo.sampling_params import SamplingParams

__version__ = "0.1.0"

_CLIENT_NAMES = frozenset({
    "InferneoClient", "AsyncInferneoClient", "InferneoError", "APIError", "APIStatusError", "APIConnectionError",
    "APITimeoutError", "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
    "ConflictError", "UnprocessableEntityError", "RateLimitError", "InternalServerError", "StructuredOutputError",
    "LengthFinishReasonError",
})

__all__ = ["LLM", "KernelConfig", "LoRARequest", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams",
           "BeamSearchParams", "BeamSearchOutput", "__version__",
           *sorted(_CLIENT_NAMES)]


def __getattr__(name: str):
    # The engine pulls in torch; import it only when asked for, so light imports stay light.
    if name == "LLM":
        from inferneo.entrypoints.llm import LLM

        return LLM
    if name == "LoRARequest":
        from inferneo.lora.request import LoRARequest

        return LoRARequest
    if name == "KernelConfig":
        from inferneo.kernel_config import KernelConfig

        return KernelConfig
    if name in _CLIENT_NAMES:
        import inferneo.client

        return getattr(inferneo.client, name)
    raise AttributeError(f"module 'inferneo' has no attribute {name!r}")
