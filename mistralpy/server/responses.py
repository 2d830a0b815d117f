"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat service.

A Responses request is rewritten into a chat-completions body (instructions → system message,
`input_text`/`input_image` parts → chat parts, function tools → chat tools, function call
items and their outputs → assistant tool calls and tool messages); the chat service does the
work, and its result or its stream of chunks is rewritten into a response object or the
Responses event sequence. The routes are the app's (`server/app.py`), which runs a turn as it
runs a chat request: the same error mapping, metrics and SSE stream, with `EventStream` as the
stream's framing. Stored responses (`store`, on by default as in OpenAI) keep their
conversation in a bounded LRU owned by the app, so `previous_response_id` continues it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from mistralpy.api.chat import InvalidRequest, NotFound
from mistralpy.errors import UserError
from mistralpy.server.protocol import _Strict

# The store keeps at most this many responses and roughly this many bytes of conversation
# (images come as base64 data URLs, so a count alone would not bound memory).
STORE_CAPACITY = 256
STORE_MAX_BYTES = 256 * 1024 * 1024

# --- request schema ----------------------------------------------------------------------


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str | None = None  # https URL or data URL
    file_id: str | None = None  # OpenAI's Files API: not served here (a clear 400)
    detail: str | None = None


class OutputText(_Strict):
    """Assistant text in a replayed conversation."""

    type: Literal["output_text"]
    text: str


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


def _item_type(item: object) -> str | None:
    """Messages may omit `type` (OpenAI's "easy input message"); None (no such tag: Pydantic
    refuses the item) for a type that is not a string."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
    else:
        kind = getattr(item, "type", "message")
    return kind if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Strict):
    type: Literal["function"]  # built-in tools (web_search, file_search...) are not served
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseTextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseTextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None


# --- request → chat body ------------------------------------------------------------------


def input_messages(items: str | list[Any]) -> list[dict]:
    """The chat messages of a Responses `input` (a string is one user message)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            messages.append(_message(item, i))
        elif isinstance(item, FunctionCallItem):
            _add_call(messages, item)
        else:
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)}
            )
    return messages


def _message(item: MessageItem, index: int) -> dict:
    if isinstance(item.content, str) or item.role == "assistant":
        # templates take an assistant turn as plain text
        content = item.content if isinstance(item.content, str) else _text(item.content)
        return {"role": item.role, "content": content}
    return {"role": item.role, "content": [_chat_part(p, index) for p in item.content]}


def _chat_part(part: InputText | InputImage | OutputText | Refusal, index: int) -> dict:
    if isinstance(part, InputImage):
        if not part.image_url:
            raise InvalidRequest(
                "input_image needs image_url (an https or data: URL); file_id is not served "
                "here, as there is no Files API",
                f"input[{index}].content",
            )
        return {"type": "image_url", "image_url": {"url": part.image_url}}
    return {"type": "text", "text": _part_text(part)}


def _part_text(part: InputText | InputImage | OutputText | Refusal) -> str:
    if isinstance(part, Refusal):
        return part.refusal
    if isinstance(part, InputImage):
        raise InvalidRequest("images are only accepted in user messages", "input")
    return part.text


def _text(content: str | list[Any]) -> str:
    return content if isinstance(content, str) else "".join(_part_text(p) for p in content)


def _add_call(messages: list[dict], item: FunctionCallItem) -> None:
    """A function_call joins the assistant turn just before it, else starts one."""
    call = _chat_call(item.call_id, item.name, item.arguments)
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _chat_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_body(req: ResponsesRequest, history: list[dict], new_messages: list[dict]) -> dict:
    """The chat-completions body that serves `req` after the stored `history`."""
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body: dict[str, Any] = {
        "messages": system + history + new_messages,
        "model": req.model,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
        "response_format": _response_format(req.text),
        "tools": _chat_tools(req.tools),
        "tool_choice": _chat_tool_choice(req.tool_choice),
    }
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return {k: v for k, v in body.items() if v is not None}


def _chat_tools(tools: list[FunctionTool] | None) -> list[dict] | None:
    if tools is None:
        return None
    return [
        {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
        for t in tools
    ]


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(text: ResponseTextConfig | None) -> dict | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
    return {
        "type": "json_schema",
        "json_schema": {k: v for k, v in schema.items() if v is not None},
    }


# --- chat result → response object --------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [_output_text(text)] if status == "completed" else [],
    }


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(message: dict) -> list[dict]:
    """A chat choice's message as Responses output items: its text, then its calls."""
    calls = message.get("tool_calls") or []
    items = []
    if message.get("content") or not calls:
        items.append(message_item(_new_id("msg"), message.get("content") or ""))
    for c in calls:
        fn = c["function"]
        items.append(call_item(_new_id("fc"), c["id"], fn["name"], fn["arguments"], "completed"))
    return items


def responses_usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


class ResponseNotFound(NotFound):
    def __init__(self, response_id: str, param: str | None = None):
        super().__init__(f"Response with id '{response_id}' not found.", param, "not_found")


# chat-completions fields an error from the chat path may name -> the Responses field a client
# sent (every "messages..." path comes from `input`, or from `instructions` at messages[0])
_RESPONSES_PARAM = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def responses_param(param: str | None) -> str | None:
    """The Responses API's name for the chat-completions field `param`."""
    if param is not None and param.startswith("messages"):
        return "input"
    return _RESPONSES_PARAM.get(param, param) if param is not None else None


@contextlib.contextmanager
def _responses_names() -> Iterator[None]:
    """A user error raised inside names the Responses field, not the chat one it became."""
    try:
        yield
    except UserError as exc:
        if getattr(exc, "param", None) is not None:
            exc.param = responses_param(exc.param)  # type: ignore[attr-defined]
        raise


async def responses_errors(result: Awaitable[dict]) -> dict:
    """`result` (a chat completion), its user errors named as the Responses API names them."""
    with _responses_names():
        return await result


async def responses_errors_stream(
    chunks: AsyncGenerator[dict, None],
) -> AsyncGenerator[dict, None]:
    """`chunks` (a chat stream), its user errors named as the Responses API names them."""
    async with contextlib.aclosing(chunks):
        with _responses_names():
            async for chunk in chunks:
                yield chunk


def start_turn(req: ResponsesRequest, store: ResponseStore, model: str) -> ResponseTurn:
    """The turn that serves `req`, after its stored conversation; raises InvalidRequest, or
    ResponseNotFound for an unknown previous_response_id."""
    if req.background:
        raise InvalidRequest("background responses are not supported", "background")
    history: list[dict] = []
    if req.previous_response_id is not None:
        history = store.find(req.previous_response_id, "previous_response_id").conversation
    new_messages = input_messages(req.input)
    body = chat_body(req, history, new_messages)
    return ResponseTurn(_new_id("resp"), req, model, body, history + new_messages, store)


@dataclass
class ResponseTurn:
    """One create request: what its response object says about it (fixed before generation
    starts), the chat body that serves it, and the conversation it continues."""

    id: str
    req: ResponsesRequest
    model: str
    body: dict  # the chat-completions body
    conversation: list[dict]  # stored history + this request's input, as chat messages
    store: ResponseStore
    created_at: int = field(default_factory=lambda: int(time.time()))

    def whole(self, result: dict) -> dict:
        """The response object of a whole chat.completion result (stored if asked)."""
        choice = result["choices"][0]
        status = status_of(choice["finish_reason"])
        response = self.object(status, output_items(choice["message"]), result.get("usage"))
        self.keep(response)
        return response

    def keep(self, response: dict) -> None:
        if self.req.store and response["status"] != "failed":
            self.store.put(response, self.conversation + output_conversation(response["output"]))

    def object(
        self,
        status: str,
        output: list[dict],
        usage: dict | None = None,
        error: dict | None = None,
    ) -> dict:
        req = self.req
        incomplete = status == "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "text": {"format": {"type": "text"}} if req.text is None else _dump(req.text),
            "tool_choice": _dump(req.tool_choice) if req.tool_choice is not None else "auto",
            "tools": [_dump(t) for t in req.tools or []],
            "truncation": "disabled",
            "store": req.store,
            "metadata": req.metadata or {},
            "user": req.user,
            "usage": responses_usage(usage),
        }


def _dump(value: Any) -> Any:
    return (
        value.model_dump(exclude_none=True, by_alias=True)
        if hasattr(value, "model_dump")
        else value
    )


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def output_conversation(output: list[dict]) -> list[dict]:
    """The chat messages a response's output adds to its conversation (one assistant turn)."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"]
    )
    calls = [
        _chat_call(item["call_id"], item["name"], item["arguments"])
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message] if text or calls else []


# --- the stored conversations -------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # the response object as the client got it
    conversation: list[dict]  # chat messages up to and including its output (no instructions)
    size: int  # bytes of the conversation as JSON (what the store's byte bound counts)


class ResponseStore:
    """An LRU of stored responses bounded in count and bytes; one per app."""

    def __init__(self, capacity: int = STORE_CAPACITY, max_bytes: int = STORE_MAX_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def find(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response; raises ResponseNotFound (a 404 naming `param`)."""
        stored = self.get(response_id)
        if stored is None:
            raise ResponseNotFound(response_id, param)
        return stored

    def put(self, response: dict, conversation: list[dict]) -> None:
        size = len(json.dumps(conversation, ensure_ascii=False))
        self.delete(response["id"])
        self._items[response["id"]] = StoredResponse(response, conversation, size)
        self._bytes += size
        while len(self._items) > self.capacity or (
            self._bytes > self.max_bytes and len(self._items) > 1
        ):
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.size

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size
        return stored is not None


# --- chat chunks → Responses events ------------------------------------------------------


@dataclass
class _OpenItem:
    index: int  # position in `output`
    item: dict  # the item as it stands (status in_progress)
    text: str = ""  # output text, or the call's arguments so far
    chat_index: int | None = None  # the chat tool-call index it comes from


@dataclass
class EventStream:
    """The SSE frames of a streamed turn: chat.completion.chunk dicts in, Responses events
    out, numbered in order (the app's stream takes it as its framing)."""

    turn: ResponseTurn
    output: list[dict] = field(default_factory=list)
    seq: int = 0
    open: _OpenItem | None = None
    finish_reason: str | None = None
    usage: dict | None = None

    def start(self) -> list[bytes]:
        response = self.turn.object("in_progress", [])
        return _frames(
            [
                self._event("response.created", response=response),
                self._event("response.in_progress", response=response),
            ]
        )

    def chunk(self, chunk: dict) -> list[bytes]:
        self.usage = chunk.get("usage") or self.usage
        events: list[dict] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return _frames(events)

    def end(self) -> list[bytes]:
        """The closing events, with the final response object (stored if asked)."""
        events = self._close()
        if not self.output:  # an empty answer is still one (empty) message
            events += self._open_message() + self._close()
        status = status_of(self.finish_reason)
        response = self.turn.object(status, self.output, self.usage)
        self.turn.keep(response)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return _frames([*events, self._event(kind, response=response)])

    def fail(self, error: dict) -> list[bytes]:
        """An error after the stream began: OpenAI's `error` event, then `response.failed`."""
        detail = error.get("error", {})
        failed = {"code": detail.get("code") or "server_error", "message": detail.get("message")}
        response = self.turn.object("failed", self.output, self.usage, error=failed)
        return _frames(
            [
                self._event("error", code=failed["code"], message=failed["message"], param=None),
                self._event("response.failed", response=response),
            ]
        )

    def _event(self, type_: str, **fields: Any) -> dict:
        self.seq += 1
        return {"type": type_, "sequence_number": self.seq - 1, **fields}

    def _text(self, text: str) -> list[dict]:
        events = []
        if self.open is None or self.open.item["type"] != "message":
            events = self._close() + self._open_message()
        item = self.open
        assert item is not None  # open before, or just opened by _open_message
        item.text += text
        ids = {"item_id": item.item["id"], "output_index": item.index, "content_index": 0}
        return [*events, self._event("response.output_text.delta", **ids, delta=text, logprobs=[])]

    def _open_message(self) -> list[dict]:
        item = message_item(_new_id("msg"), "", "in_progress")
        self.open = _OpenItem(len(self.output), item)
        self.output.append(item)
        part = _output_text("")
        ids = {"item_id": item["id"], "output_index": self.open.index, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=self.open.index, item=item),
            self._event("response.content_part.added", **ids, part=part),
        ]

    def _call(self, call: dict) -> list[dict]:
        fn = call.get("function") or {}
        events = []
        if self.open is None or self.open.chat_index != call.get("index"):
            events = self._close()
            item = call_item(
                _new_id("fc"), call.get("id", ""), fn.get("name", ""), "", "in_progress"
            )
            self.open = _OpenItem(len(self.output), item, chat_index=call.get("index"))
            self.output.append(item)
            events.append(
                self._event("response.output_item.added", output_index=self.open.index, item=item)
            )
        if fn.get("arguments"):
            self.open.text += fn["arguments"]
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.open.item["id"],
                    output_index=self.open.index,
                    delta=fn["arguments"],
                )
            )
        return events

    def _close(self) -> list[dict]:
        """Finish the open item: its done events, and its final form in `output`."""
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"item_id": item.item["id"], "output_index": item.index}
        if item.item["type"] == "message":
            done = message_item(item.item["id"], item.text)
            events = [
                self._event(
                    "response.output_text.done", **at, content_index=0, text=item.text, logprobs=[]
                ),
                self._event(
                    "response.content_part.done",
                    **at,
                    content_index=0,
                    part=_output_text(item.text),
                ),
            ]
        else:
            done = {**item.item, "arguments": item.text, "status": "completed"}
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    **at,
                    arguments=item.text,
                    name=done["name"],
                )
            ]
        self.output[item.index] = done
        return [
            *events,
            self._event("response.output_item.done", output_index=item.index, item=done),
        ]


def _frames(events: list[dict]) -> list[bytes]:
    return [
        f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n".encode()
        for e in events
    ]
