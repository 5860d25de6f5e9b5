"""The inputs of the batching guide's two basic examples (``../shared/spec/batching-guide.md``), for the server
tests and the GPU suites that run them against ``inferneo serve``."""

GUIDE_MODEL = "meta-llama/Llama-2-7b-chat-hf"
GUIDE_PROMPTS = ["Explain machine learning", "What is deep learning?", "Describe neural networks",
                 "How does backpropagation work?"]
GUIDE_CONVERSATIONS = [
    [{"role": "user", "content": "What is AI?"},
     {"role": "assistant", "content": "AI stands for Artificial Intelligence..."},
     {"role": "user", "content": "Give me an example"}],
    [{"role": "user", "content": "Explain machine learning"}, {"role": "user", "content": "What are the types?"}],
    [{"role": "user", "content": "How do neural networks work?"}],
]
