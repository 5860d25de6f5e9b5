"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) beside the OpenAI routes,
so that Anthropic SDK users and tools such as Claude Code can point at a local model. A Messages request runs as the
equivalent chat completion request (``protocol.MessagesRequest.to_chat``), so sampling, tool calling, structured
output and their checks are the chat endpoint's; ``serving`` writes its answer in Anthropic's shapes and
``errors`` gives these routes Anthropic's error body."""
