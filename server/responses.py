"""POST /v1/responses: OpenAI's Responses API for a stateless text model. `input` (a string, message
items, and the function calls and outputs of a tool loop) and `instructions` go through the chat
template; the output is an assistant message and/or function calls. `text.format` constrains the text
(JSON, a JSON schema) and function `tools` with `tool_choice` are served as in chat completions (the same
grammars and tool-call parser). Streamed, the events are those the openai SDK parses, always ending with
`response.completed` (whose status is "incomplete" when max_output_tokens cut the text, as vLLM does).
Nothing is stored: `store: true` and `previous_response_id` are refused, as are built-in tools,
reasoning and background mode."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from engine.structured_output import StructuredOutputsParams
from engine.tokenizer import Tokenizer
from server.errors import bad_request
from server.generation import (
    Choice,
    collect_unless_disconnected,
    compile_grammar,
    sampling_params,
    submit,
)
from server.logprobs import chat_logprobs
from server.prompts import encode, render_chat
from server.protocol import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    SamplingFields,
    TokenLogprob,
    Tool,
    ToolCall,
)
from server.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputContentPart,
    InputTokensDetails,
    NamedToolChoice,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from server.responses_stream import OutputStream, event
from server.sse import EventStreamResponse
from server.state import ServerState
from server.tool_calls import ToolPlan, check_template_kept_tools, plan_tools, template_messages, with_tools

LOGPROBS_INCLUDE = "message.output_text.logprobs"

# Fields this server cannot honour: any value but "unset" is refused, naming the field.
_NOT_SUPPORTED = {
    "previous_response_id": "this server stores no responses; send the whole conversation as input",
    "reasoning": "reasoning options are not supported by this model",
    "background": "background mode is not supported",
    "conversation": "conversations are not supported; send the whole conversation as input",
    "prompt": "prompt templates are not supported",
    "context_management": "context management is not supported",
    "max_tool_calls": "a limit on tool calls is not supported; use parallel_tool_calls false for one call",
}


def _reject_unsupported(req: ResponsesRequest) -> None:
    for name, why in _NOT_SUPPORTED.items():
        if getattr(req, name) not in (None, False, [], {}):
            raise bad_request(f"{name} is not supported: {why}", name)
    if req.store:
        raise bad_request("store is not supported: this server stores no responses; set store to false", "store")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported; only 'disabled'", "truncation")
    for value in req.include or []:
        if value != LOGPROBS_INCLUDE:
            raise bad_request(f"include value {value!r} is not supported; only {LOGPROBS_INCLUDE!r}", "include")


def _structured_outputs(req: ResponsesRequest) -> StructuredOutputsParams | None:
    """The constraint that `text.format` puts on the output text (None for plain text)."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("text.format of type 'json_schema' needs a schema", "text.format")
        return StructuredOutputsParams(json=fmt.json_schema)
    raise bad_request(f"text.format of type {fmt.type!r} is not supported; use 'text', 'json_object' or "
                      "'json_schema'", "text.format")


def _functions(req: ResponsesRequest) -> list[FunctionDefinition]:
    functions = []
    for i, tool in enumerate(req.tools or []):
        if tool.type != "function":
            raise bad_request(f"tools[{i}]: tools of type {tool.type!r} are not supported; only function tools",
                              "tools")
        try:
            functions.append(FunctionDefinition(name=tool.name, description=tool.description,
                                                parameters=tool.parameters, strict=tool.strict))
        except ValidationError:
            raise bad_request(f"tools[{i}]: a function tool needs a name of letters, digits, '_', '.' or '-' "
                              "(at most 64)", "tools") from None
    return functions


def _plan_tools(req: ResponsesRequest, functions: list[FunctionDefinition], state: ServerState,
                tokenizer: Tokenizer) -> ToolPlan | None:
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.type != "function" or choice.name is None:
            raise bad_request(f"tool_choice of type {choice.type!r} is not supported; use 'none', 'auto', "
                              "'required' or {'type': 'function', 'name': ...}", "tool_choice")
        choice = NamedFunction(name=choice.name)
    return plan_tools(functions, choice, req.parallel_tool_calls, None, state.settings, tokenizer)


def _text(content: str | list[InputContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise bad_request(f"{where}[{j}]: parts of type {part.type!r} are not supported; only text", "input")
    return "".join(part.text for part in content)


def _messages(req: ResponsesRequest) -> tuple[list[ChatMessage], list[int]]:
    """Chat messages and the input item each comes from: instructions as the system message, then the
    input (a string is one user message). Function calls join the assistant message before them (or
    start one); their outputs are "tool" messages."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    positions = [-1] * len(messages)
    if isinstance(req.input, str):
        return [*messages, ChatMessage(role="user", content=req.input)], [*positions, 0]
    if not req.input:
        raise bad_request("input must not be empty", "input")

    def add(message: ChatMessage, position: int) -> None:
        messages.append(message)
        positions.append(position)

    for i, item in enumerate(req.input):
        if item.type == "message" and item.role is not None:
            role = "system" if item.role == "developer" else item.role
            add(ChatMessage(role=role, content=_text(item.content, f"input[{i}].content")), i)
        elif item.type == "function_call" and None not in (item.call_id, item.name, item.arguments):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if not (messages and messages[-1].role == "assistant"):
                add(ChatMessage(role="assistant", content=None), i)
            messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
        elif item.type == "function_call_output" and item.call_id is not None and item.output is not None:
            add(ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output, f"input[{i}].output")),
                i)
        else:
            raise bad_request(f"input[{i}]: items of type {item.type!r} are not supported (or lack fields); only "
                              "messages with a role, function_call (call_id, name, arguments) and "
                              "function_call_output (call_id, output)", "input")
    return messages, positions


def _output_items(choice: Choice, tools: ToolPlan | None, message_id: str,
                  logprobs: list[TokenLogprob]) -> list[OutputMessage | FunctionCallItem]:
    """A whole response's output: the message (unless the model only called functions), then the calls."""
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    content, calls = tools.parser.extract(choice.text) if tools else (choice.text, [])
    text = OutputText(text=content or "", logprobs=logprobs)
    message = [OutputMessage(id=message_id, status=status, content=[text])] if content is not None or not calls else []
    return [*message, *(FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.name,
                                         arguments=call.arguments, status=status) for call in calls)]


async def create_response(req: ResponsesRequest, request: Request, state: ServerState) -> Response:
    arrival = time.monotonic()
    model = state.check_model(req.model)
    engine = state.ready_engine()
    _reject_unsupported(req)
    tokenizer = engine.tokenizer
    functions = _functions(req)
    tools = _plan_tools(req, functions, state, tokenizer)
    structured = _structured_outputs(req)
    want_logprobs = req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or [])
    if tools is not None and structured is not None:
        raise bad_request("text.format cannot be combined with tool calls; use tool_choice 'none'", "text.format")
    if tools is not None and want_logprobs:
        raise bad_request("logprobs cannot be combined with tool calls; use tool_choice 'none'",
                          "top_logprobs" if req.top_logprobs is not None else "include")
    top_k = req.top_logprobs or 0
    fields = SamplingFields(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    params = sampling_params(fields, max_tokens=req.max_output_tokens, logprobs=top_k if want_logprobs else None,
                             prompt_logprobs=None, structured_outputs=tools.structured_outputs if tools else structured,
                             skip_special_tokens=False if tools and tools.parser.special_tags else None)
    await compile_grammar(engine, params, "tools" if tools else "text.format")
    messages, positions = _messages(req)
    tool_list = [Tool(type="function", function=f) for f in functions]
    text = await render_chat(tokenizer, template_messages(messages), True, with_tools({}, tool_list),
                             "input")
    check_template_kept_tools(messages, text, "input", positions)
    # The template already holds the special tokens it wants (as for chat completions).
    prompt = await encode(tokenizer, text, add_special_tokens=False)
    response_id, message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    created = int(time.time())
    generation = submit(state, engine, response_id, [prompt], params, arrival, prompt_param="input",
                        model=model)
    choice_echo = req.tool_choice or ("auto" if req.tools else "none")
    echoed = {"tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
              "tool_choice": choice_echo if isinstance(choice_echo, str) else choice_echo.model_dump(exclude_none=True),
              "parallel_tool_calls": req.parallel_tool_calls}
    if req.text is not None and req.text.format is not None:
        echoed["text"] = {"format": req.text.format.model_dump(exclude_none=True, by_alias=True)}

    def response(status: str, output: list[OutputMessage | FunctionCallItem],
                 usage: ResponseUsage | None = None) -> ResponseObject:
        return ResponseObject(
            id=response_id, created_at=created, status=status, model=model, output=output, usage=usage,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, temperature=params.temperature,
            top_p=params.top_p, top_logprobs=req.top_logprobs, metadata=req.metadata, **echoed)

    def logprobs(token_ids: list[int], values: list[dict[int, float]]) -> list:
        return chat_logprobs(tokenizer, token_ids, values, top_k) if want_logprobs else []

    def final(choice: Choice, output: list[OutputMessage | FunctionCallItem]) -> ResponseObject:
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        usage = ResponseUsage(input_tokens=len(prompt), output_tokens=len(choice.token_ids),
                              total_tokens=len(prompt) + len(choice.token_ids),
                              input_tokens_details=InputTokensDetails(cached_tokens=choice.num_cached_tokens))
        return response(status, output, usage)

    if not req.stream:
        choices = await collect_unless_disconnected(request, generation, 1)
        if choices is None:
            return Response(status_code=499)
        choice = choices[0]
        output = _output_items(choice, tools, message_id, logprobs(choice.token_ids, choice.logprobs))
        return JSONResponse(final(choice, output).model_dump())

    async def events() -> AsyncIterator[str]:
        sequence = itertools.count()
        yield event("response.created", sequence, response=response("in_progress", []))
        yield event("response.in_progress", sequence, response=response("in_progress", []))
        output = OutputStream(sequence, message_id)
        streamer = tools.parser.streamer() if tools else None
        if streamer is None:  # plain text: the message opens at once
            for e in output.text("", []):
                yield e
        choice = Choice()
        async for _, out in generation.outputs():
            choice.add(out)  # an engine failure raises here and is reported in the stream
            if streamer is None:
                chunks = output.text(out.new_text, logprobs(out.new_token_ids, out.new_logprobs or []))
            else:
                deltas = streamer.feed(out.new_text, final=out.finished)
                chunks = [e for delta in deltas for e in _tool_events(output, delta)]
            for e in chunks:
                yield e
        if not output.items:  # the model wrote nothing: an empty message, as when not streamed
            for e in output.text("", []):
                yield e
        for e in output.close("incomplete" if choice.finish_reason == "length" else "completed"):
            yield e
        yield event("response.completed", sequence, response=final(choice, output.items))

    return EventStreamResponse(events(), close=generation.close)


def _tool_events(output: OutputStream, delta: dict) -> list[str]:
    """Events for one chat-style delta of the tool-call streamer (content, or a call's start and arguments)."""
    if "content" in delta:
        return output.text(delta["content"], [])
    events = []
    for call in delta["tool_calls"]:
        if "id" in call:
            events += output.call(call["id"], call["function"]["name"])
        if call["function"].get("arguments"):
            events += output.arguments(call["function"]["arguments"])
    return events
