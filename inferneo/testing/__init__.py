"""Helpers for tests: tiny checkpoints built offline."""

from inferneo.testing.tiny_models import make_tiny_checkpoint, make_tiny_gguf, make_tiny_tokenizer

__all__ = ["make_tiny_checkpoint", "make_tiny_gguf", "make_tiny_tokenizer"]
