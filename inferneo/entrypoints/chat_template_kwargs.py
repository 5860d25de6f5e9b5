"""The rule for ``chat_template_kwargs``, one for ``LLM.chat`` and the server's chat completions.

The keyword arguments go to transformers' ``apply_chat_template`` beside the ones Inferneo sets itself. A key that
would set one of those (the conversation, the tools, where the prompt ends) or change what the call returns
(token ids or a dict instead of text, padding, truncation) is refused, naming the key and the field that sets it,
instead of being dropped without a word or breaking the rendering.
"""

from __future__ import annotations

from typing import Any

# keys that name what the caller sets through its own argument or field, and the field
TEMPLATE_OWN_FIELDS = {
    "conversation": "messages", "messages": "messages", "tools": "tools", "documents": "documents",
    "add_generation_prompt": "add_generation_prompt", "continue_final_message": "continue_final_message",
    "chat_template": "chat_template",
}
# keys that change what apply_chat_template returns, not the template's text
TEMPLATE_CALL_KEYS = frozenset({"tokenize", "return_dict", "return_tensors", "padding", "truncation", "max_length",
                                "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_kwargs_error(kwargs: dict[str, Any] | None) -> str | None:
    """Why ``kwargs`` cannot be passed as ``chat_template_kwargs``, or None when they can."""
    if not kwargs:
        return None
    own = sorted(k for k in kwargs if k in TEMPLATE_OWN_FIELDS)
    if own:
        fields = ", ".join(sorted({TEMPLATE_OWN_FIELDS[k] for k in own}))
        return f"chat_template_kwargs cannot set {', '.join(own)}: give it as {fields} instead"
    call = sorted(k for k in kwargs if k in TEMPLATE_CALL_KEYS)
    if call:
        return (f"chat_template_kwargs cannot set {', '.join(call)}: they change what the template call returns, "
                "not the template's variables")
    return None
