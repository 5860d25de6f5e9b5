"""Inferneo: continuous-batching LLM inference, offline and behind an OpenAI-compatible server."""

from inferneo.outputs import CompletionOutput, Logprob, RequestOutput
from inferneo.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch; import it only when asked for, so light imports stay light.
    if name == "LLM":
        from inferneo.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'inferneo' has no attribute {name!r}")
