"""Tools in chat completions: which tool_choice applies, the grammar that enforces it, and the history
of a tool loop (assistant tool_calls, "tool" messages) rendered by the chat template, never dropped.

tool_choice "required" or a named function: the output is one or more calls (one for a named function
or parallel_tool_calls=false), written in the parser's format and constrained by a grammar, so the
arguments always match the function's schema. "auto" needs --enable-auto-tool-choice and
--tool-call-parser (as in vLLM): free text, and once the model opens a call, the same grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.structured_output import StructuredOutputsParams
from engine.tokenizer import Tokenizer
from server.errors import bad_request
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    Tool,
)
from server.state import ServerSettings
from server.tool_parsers import TOOL_PARSERS, HermesToolParser


@dataclass
class ToolPlan:
    parser: HermesToolParser
    structured_outputs: StructuredOutputsParams


def template_messages(chat: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template. Tool-call arguments become objects, as transformers' templates
    expect (OpenAI sends them as JSON text); text that is not JSON stays text."""
    messages = []
    for m in chat:
        message = m.model_dump(exclude_none=True)
        for call in message.get("tool_calls", []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                pass
        messages.append(message)
    return messages


def with_tools(template_kwargs: dict[str, Any], tools: list[Tool] | None) -> dict[str, Any]:
    """Template arguments with the tools as the template's `tools` variable (as transformers passes them)."""
    return {**template_kwargs, "tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else template_kwargs


def check_template_kept_tools(messages: list[ChatMessage], prompt: str, param: str = "messages",
                              positions: list[int] | None = None) -> None:
    """400 if the chat template left out a tool call or a tool result of the history. positions: where
    each message is in the request's `param` list (default: at its own index)."""
    for i, m in zip(positions or range(len(messages)), messages):
        pieces = [c.function.name for c in m.tool_calls or []]
        if m.role == "tool" and isinstance(m.content, str):
            pieces.append(m.content)
        for piece in pieces:
            if piece not in prompt:
                raise bad_request(f"the model's chat template does not render tool calls or tool results "
                                  f"({param}[{i}] would be dropped); pass one that does with --chat-template",
                                  f"{param}.{i}")


def plan_chat_tools(req: ChatCompletionRequest, settings: ServerSettings, tokenizer: Tokenizer) -> ToolPlan | None:
    """plan_tools for a chat completion request (whose deprecated `functions` are refused)."""
    if req.functions is not None or req.function_call is not None:
        raise bad_request("functions and function_call are deprecated and not supported; use tools and "
                          "tool_choice", "functions" if req.functions is not None else "function_call")
    template = req.chat_template or (req.chat_template_kwargs or {}).get("chat_template")
    choice = req.tool_choice.function if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    return plan_tools([t.function for t in req.tools or []], choice, req.parallel_tool_calls,
                      template if isinstance(template, str) else None, settings, tokenizer)


def plan_tools(functions: list[FunctionDefinition], choice: str | NamedFunction | None, parallel: bool,
               chat_template: str | None, settings: ServerSettings, tokenizer: Tokenizer) -> ToolPlan | None:
    """The grammar and parser of a request with tools, None if the output is plain text. Bad use -> 400.
    choice: "none", "auto", "required", a named function, or None (auto with tools, else none)."""
    tools = [f.model_dump(exclude_none=True) for f in functions]
    choice = choice if choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not tokenizer.chat_template_uses("tools", chat_template):
        raise bad_request("the model's chat template does not support tools (it never reads `tools`); pass one "
                          "that does with --chat-template", "tools")
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    if choice == "none":
        return None
    if choice == "auto" and not (settings.enable_auto_tool_choice and settings.tool_call_parser):
        raise bad_request('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                          "--tool-call-parser", "tool_choice")
    parser = TOOL_PARSERS[settings.tool_call_parser or "hermes"](tokenizer)
    if not isinstance(choice, str):  # a named function: exactly one call of it
        chosen = [t for t in tools if t["name"] == choice.name]
        if not chosen:
            raise bad_request(f"tool_choice names function {choice.name!r}, which is not in tools", "tool_choice")
        tools, choice, parallel = chosen, "required", False
    return ToolPlan(parser, StructuredOutputsParams(grammar=parser.grammar(tools, choice, parallel)))
