"""Batched token sampling: per-step metadata and the sampler."""

from inferneo.sampling.metadata import SamplingMetadata, SamplingRow, TokenBitmask
from inferneo.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "SamplingRow", "TokenBitmask"]
