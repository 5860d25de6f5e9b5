"""Server-wide options of the answers ``inferneo serve`` gives (vLLM's ``serve`` flags of the same names): the role
of chat answers, token ids in place of token texts in log-probabilities, and usage in every stream."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    """``response_role``: the role of a chat answer when the conversation is rendered with a new assistant turn
    (``add_generation_prompt``, the default); without one the answer continues the last message and takes its
    role, as vLLM answers. ``return_tokens_as_token_ids``: log-probabilities name tokens ``token_id:N`` instead of
    their text (the default of the requests' ``return_tokens_as_token_ids`` field), so that tokens that are no
    whole characters can be told apart. ``force_include_usage``: every streamed completion and chat answer carries
    ``usage`` as if it had asked ``stream_options: {include_usage: true, continuous_usage_stats: true}`` (vLLM's
    ``--enable-force-include-usage``): the counts so far in each chunk and the totals in a last chunk."""

    response_role: str = "assistant"
    return_tokens_as_token_ids: bool = False
    force_include_usage: bool = False

    def __post_init__(self) -> None:
        if not self.response_role or not self.response_role.strip():
            raise ValueError("--response-role must be a non-empty role name (default: assistant)")


def add_response_args(group: argparse._ArgumentGroup) -> None:
    """The flags of :class:`ResponseOptions`."""
    group.add_argument(
        "--response-role",
        default="assistant",
        metavar="ROLE",
        help="the role of chat answers to conversations rendered with a new assistant turn "
        "(add_generation_prompt, the default); otherwise an answer takes the last message's role "
        "(default: assistant)",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="log-probabilities name their tokens 'token_id:N' instead of the token's text (a "
        "request's return_tokens_as_token_ids field overrides this)",
    )
    group.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="every streamed completion and chat answer carries usage (the counts so far in each "
        "chunk, the totals in a last chunk), as if it asked stream_options include_usage and "
        "continuous_usage_stats",
    )


def response_options_from_args(args: argparse.Namespace) -> ResponseOptions:
    """``ResponseOptions`` from the flags ``add_response_args`` added."""
    return ResponseOptions(
        response_role=args.response_role,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        force_include_usage=args.enable_force_include_usage,
    )
