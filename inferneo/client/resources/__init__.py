"""One module per endpoint; each has a sync resource and its async twin."""

from inferneo.client.resources.batches import AsyncBatches, Batches
from inferneo.client.resources.chat import AsyncChat, AsyncChatCompletions, Chat, ChatCompletions
from inferneo.client.resources.completions import AsyncCompletions, Completions
from inferneo.client.resources.files import AsyncFiles, Files
from inferneo.client.resources.models import AsyncModels, Models

__all__ = ["AsyncBatches", "AsyncChat", "AsyncChatCompletions", "AsyncCompletions", "AsyncFiles", "AsyncModels",
           "Batches", "Chat", "ChatCompletions", "Completions", "Files", "Models"]
