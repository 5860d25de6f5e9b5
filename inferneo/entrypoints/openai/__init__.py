"""The OpenAI-compatible HTTP server (``inferneo serve``)."""
