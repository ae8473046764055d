"""Prompts from request bodies: chat templates rendered and text tokenized off the event loop.

A chat template is code: one sent by a client runs only when the operator allows it
(`--trust-request-chat-template`, vLLM's flag), whether it comes as `chat_template` or inside
`chat_template_kwargs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.errors import bad_request
from server.generation import off_loop

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer
    from server.state import ServerSettings

_RESERVED_TEMPLATE_VARIABLES = {"messages", "add_generation_prompt"}


def template_arguments(settings: ServerSettings, chat_template: str | None,
                       chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for Tokenizer.apply_chat_template; 400 for what is not allowed."""
    kwargs = dict(chat_template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_VARIABLES & kwargs.keys())
    if clash:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(clash)}", "chat_template_kwargs")
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    if "chat_template" in kwargs:
        param = "chat_template" if chat_template is not None else "chat_template_kwargs"
        if not settings.trust_request_chat_template:
            raise bad_request("a chat template sent with the request is refused: this server uses its own (start "
                              "it with --trust-request-chat-template to allow client templates)", param)
        if not isinstance(kwargs["chat_template"], str):
            raise bad_request("chat_template must be a string", param)
    return kwargs


async def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      template_kwargs: dict[str, Any], param: str = "messages") -> str:
    """The rendered template; a template error is a 400 naming `param`, the field the messages came from."""
    try:
        return await off_loop(tokenizer.apply_chat_template, messages,
                              add_generation_prompt=add_generation_prompt, **template_kwargs)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param) from None


async def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return await off_loop(tokenizer.encode, text, add_special_tokens=add_special_tokens)
