"""Hermes-style tool calls, as Falcon-H1-Instruct (and Qwen, Hermes) write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call (several in a row for parallel calls); a JSON list of calls inside one block is read
too. The grammars make the model write exactly this, with arguments that match the function's schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.structured_output.params import COMPACT_JSON, closed_objects
from engine.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


def _calls_in(body: str) -> list[ParsedCall] | None:
    """The calls in one block's text, or None if it is not a call (or a list of calls) in JSON."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return None
        calls.append(ParsedCall(item["name"], json.dumps(item.get("arguments", {}), ensure_ascii=False)))
    return calls


def _json_value_end(text: str) -> int | None:
    """Where the JSON object or array at the start of text ends (index past it), None if not yet."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class HermesToolParser:
    def __init__(self, tokenizer: Tokenizer):
        # If the tokenizer has the tags as special tokens, the grammar must ask for those tokens (and
        # the detokenizer must keep them in the text).
        self.special_tags = all(tokenizer.token_to_id(t) in tokenizer.all_special_ids for t in (OPEN, CLOSE))

    # ---- grammars

    def _tag(self, tag: str) -> str:
        return tag if self.special_tags else json.dumps(tag)

    def grammar(self, tools: list[dict[str, Any]], mode: str, parallel: bool) -> str:
        """Lark for llguidance. mode: "required" (one or more calls, nothing else), or "auto" (text, or
        text then calls: the grammar is lazy until the model writes the opening tag)."""
        functions = []
        for i, tool in enumerate(tools):
            arguments = closed_objects(tool.get("parameters") or NO_PARAMETERS)
            schema = {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": arguments},
                      "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": COMPACT_JSON}
            functions.append(f"fn_{i}: %json {json.dumps(schema)}")
        body = f'"\\n" ({" | ".join(f"fn_{i}" for i in range(len(tools)))}) "\\n" {self._tag(CLOSE)}'
        more = f'("\\n" {self._tag(OPEN)} body)*' if parallel else ""
        if mode == "required":
            start = f"start: {self._tag(OPEN)} body {more}"
        else:
            start = (f"start: TEXT | text_then_open body {more}\n"
                     f"TEXT: /(.|\\n)*/\n"
                     f"text_then_open[lazy]: /(.|\\n)*/ {self._tag(OPEN)}")
        return "\n".join(["%llguidance {}", start, f"body: {body}", *functions]) + "\n"

    # ---- reading calls back

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the calls or None, calls). Text whose blocks do not parse stays content."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls: list[ParsedCall] = []
        for match in _BLOCK.finditer(text, start):
            found = _calls_in(match.group(1))
            if found is None:
                return text, []
            calls += found
        content = text[:start].rstrip()
        return content or None, calls

    def streamer(self) -> HermesStreamer:
        return HermesStreamer()


class HermesStreamer:
    """Turns text deltas into OpenAI chat deltas: {"content": ...} before the first call, then
    {"tool_calls": [...]} with each call's id and name first and its arguments as they are written."""

    def __init__(self) -> None:
        self.text = ""
        self.content_sent = 0  # characters of text sent as content
        self.in_calls = False
        self.calls: list[dict[str, Any]] = []  # per call: id, name, arguments text sent
        self._block = 0  # start (after the tag) of the block being read

    def feed(self, delta: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += delta
        out: list[dict[str, Any]] = []
        if not self.in_calls:
            tag = self.text.find(OPEN, self.content_sent)
            if tag < 0:
                # hold back a tail that may be the start of the tag
                end = len(self.text) if final else self._safe_end()
                if end > self.content_sent:
                    out.append({"content": self.text[self.content_sent:end]})
                    self.content_sent = end
                return out
            content = self.text[self.content_sent:tag].rstrip()  # as extract(): no whitespace before the tag
            if content:
                out.append({"content": content})
            self.in_calls, self._block = True, tag + len(OPEN)
        while True:
            close = self.text.find(CLOSE, self._block)
            body = self.text[self._block: close if close >= 0 else len(self.text)]
            out += self._call_deltas(body, done=close >= 0 or final)
            if close < 0:
                return out
            nxt = self.text.find(OPEN, close)
            if nxt < 0:
                return out
            self._block = nxt + len(OPEN)

    def _safe_end(self) -> int:
        """End of the content that is sure not to be (whitespace before) the start of an opening tag."""
        end = len(self.text)
        for k in range(min(len(OPEN) - 1, end), 0, -1):
            if OPEN.startswith(self.text[-k:]):
                end -= k
                break
        while end > self.content_sent and self.text[end - 1].isspace():
            end -= 1
        return end

    def _call_deltas(self, body: str, done: bool) -> list[dict[str, Any]]:
        """Deltas for the block whose text so far is body (calls of earlier blocks are already sent)."""
        block_index = self._block
        current = [c for c in self.calls if c["block"] == block_index]
        header = _HEADER.match(body)
        if header is None or (current and current[0]["list"]):
            # not the usual one-object shape (e.g. a list of calls): send whole calls once the block is done
            if not done or current:
                return []
            found = _calls_in(body) or []
            deltas = []
            for call in found:
                self.calls.append({"block": block_index, "id": call.id, "sent": call.arguments, "list": True})
                deltas.append(self._delta(len(self.calls) - 1, call.id, call.name, call.arguments))
            return deltas
        deltas = []
        if not current:
            call = {"block": block_index, "id": new_call_id(), "sent": "", "list": False}
            self.calls.append(call)
            deltas.append(self._delta(len(self.calls) - 1, call["id"], json.loads(header.group(1)), ""))
            current = [call]
        call, index = current[0], self.calls.index(current[0])
        arguments = body[header.end():]
        end = _json_value_end(arguments)
        if end is not None:
            arguments = arguments[:end]
        if len(arguments) > len(call["sent"]):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments[len(call["sent"]):]}}]})
            call["sent"] = arguments
        return deltas

    @staticmethod
    def _delta(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}
