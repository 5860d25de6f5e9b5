"""Embeddings: how a model's hidden states become one vector per input (see ``docs/embeddings.md``).

``config`` reads the model folder's sentence-transformers files (or falls back to last-token pooling, normalised);
``pooler`` does the arithmetic, chunk by chunk, for the runner and the core.
"""

from inferneo.pooling.config import (
    PoolingConfig,
    lacks_output_head,
    load_classifier_config,
    load_pooling_config,
)

__all__ = ["PoolingConfig", "lacks_output_head", "load_classifier_config", "load_pooling_config"]
