"""The output items of a streamed response as the server-sent events that open, grow and close them:
a message (`response.output_item.added`, `content_part.added`, `output_text.delta`..., then the `.done`
events) and function calls (`output_item.added`, `function_call_arguments.delta`..., `.done`). One item
is open at a time; opening the next closes it."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from pydantic import BaseModel

from server.protocol import TokenLogprob
from server.protocol_responses import FunctionCallItem, OutputMessage, OutputText


def event(kind: str, sequence: itertools.count, **fields: Any) -> str:
    """One server-sent event as OpenAI sends it: its type both as the event name and in the data."""
    data = {"type": kind, "sequence_number": next(sequence),
            **{k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class OutputStream:
    def __init__(self, sequence: itertools.count, message_id: str) -> None:
        self.sequence = sequence
        self.message_id = message_id
        self.items: list[OutputMessage | FunctionCallItem] = []
        self._open = False

    def _event(self, kind: str, **fields: Any) -> str:
        return event(kind, self.sequence, **fields)

    def text(self, delta: str, logprobs: list[TokenLogprob]) -> list[str]:
        """Events for more text of the message (opening it first, if it is not the open item)."""
        events = []
        if not (self._open and isinstance(self.items[-1], OutputMessage)):
            events += self.close("completed")
            self.items.append(OutputMessage(id=self.message_id, status="in_progress", content=[]))
            self._open = True
            events.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                      item=self.items[-1]))
            self.items[-1].content.append(OutputText(text=""))
            events.append(self._event("response.content_part.added", **self._where(), part=OutputText(text="")))
        if delta or logprobs:
            part = self.items[-1].content[0]
            part.text += delta
            part.logprobs += logprobs
            events.append(self._event("response.output_text.delta", **self._where(), delta=delta,
                                      logprobs=[lp.model_dump() for lp in logprobs]))
        return events

    def call(self, call_id: str, name: str) -> list[str]:
        """Events that close the open item and open a function call."""
        events = self.close("completed")
        self.items.append(FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call_id, name=name, arguments="",
                                           status="in_progress"))
        self._open = True
        events.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                  item=self.items[-1]))
        return events

    def arguments(self, delta: str) -> list[str]:
        """Events for more of the open function call's arguments."""
        call = self.items[-1]
        call.arguments += delta
        return [self._event("response.function_call_arguments.delta", item_id=call.id,
                            output_index=len(self.items) - 1, delta=delta)]

    def close(self, status: str) -> list[str]:
        """Events that finish the open item (none if no item is open) with this status."""
        if not self._open:
            return []
        self._open = False
        item, index = self.items[-1], len(self.items) - 1
        item.status = status
        if isinstance(item, OutputMessage):
            part = item.content[0]
            logprobs = [lp.model_dump() for lp in part.logprobs]
            events = [self._event("response.output_text.done", **self._where(), text=part.text, logprobs=logprobs),
                      self._event("response.content_part.done", **self._where(), part=part)]
        else:
            events = [self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                  arguments=item.arguments)]
        return [*events, self._event("response.output_item.done", output_index=index, item=item)]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": len(self.items) - 1, "content_index": 0}
