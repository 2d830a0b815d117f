"""Mistral tool-call output → OpenAI `tool_calls`, whole or as streaming deltas.

Two output formats are understood, each possibly repeated and preceded by plain text:
  v7  (Small 3.1): `[TOOL_CALLS][{"name": "f", "arguments": {...}, "id": "abc123XYZ"}, ...]`
  v11 (Small 3.2): `[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{...}` (the `[CALL_ID]` part is optional)

Streaming and whole-text parsing share one scanner: the streaming parser re-scans the text it
has so far on every delta (tool-call text is short, so this stays cheap) and emits only what
is new, so the concatenated deltas equal the whole-text parse. The one exception: a v7 call
whose model-given `id` comes *after* its arguments started streaming keeps the generated id in
the stream (OpenAI sends the id in the first delta of a call). Malformed or unfinished
tool-call text (a call cut by max_tokens) is dropped, never an exception: the content is the
text before its `[TOOL_CALLS]` marker, so control-token text never reaches a client's content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_ID_ALPHABET = string.ascii_letters + string.digits
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_WS = " \t\r\n"


def generate_tool_call_id() -> str:
    """A fresh 9-character alphanumeric id, the form Mistral models use."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as the model wrote it

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedToolOutput:
    content: str | None  # text outside the tool calls; None when empty
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    content: str = ""  # new plain text
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI `delta.tool_calls` items


class _Malformed(Exception):
    """Internal: the text after `[TOOL_CALLS]` is not a tool call."""


@dataclass
class _PartialCall:
    name: str | None = None  # known once complete
    id: str | None = None
    id_pending: bool = True  # the model may still give an id before the arguments
    args: str = ""  # raw JSON text of the arguments seen so far
    args_started: bool = False
    args_done: bool = False
    args_streamable: bool = True  # False when arguments are a JSON-encoded string


@dataclass
class _Scan:
    content: str  # plain text that is safe to emit
    calls: list[_PartialCall]


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _scan_string(text: str, i: int) -> int | None:
    """End index (exclusive) of the JSON string starting at text[i] == '"'; None if unfinished."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        if c == "\n":
            raise _Malformed("newline in string")
        i += 1
    return None


def _scan_value(text: str, i: int) -> int | None:
    """End index of the JSON value starting at text[i]; None if the text ends inside it."""
    c = text[i]
    if c == '"':
        return _scan_string(text, i)
    if c not in "[{":
        j = i
        while j < len(text) and text[j] not in ",]}" + _WS:
            j += 1
        if j == len(text):
            return None
        _loads(text[i:j])
        return j
    stack = [c]
    i += 1
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _scan_string(text, i)
            if end is None:
                return None
            i = end
            continue
        if c in "[{":
            stack.append(c)
        elif c in "]}":
            if stack.pop() != ("[" if c == "]" else "{"):
                raise _Malformed("mismatched brackets")
            if not stack:
                return i + 1
        i += 1
    return None


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise _Malformed(str(e)) from None


def _scan_v7_object(text: str, i: int, call: _PartialCall) -> int | None:
    """Fill `call` from the object at text[i] == '{'; end index, None if unfinished."""
    i, first = i + 1, True
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return None
        if text[i] == "}":
            if call.name is None:
                raise _Malformed("tool call without a name")
            call.id_pending = False
            if not call.args_started:
                call.args, call.args_started, call.args_done = "{}", True, True
            return i + 1
        if not first:
            after = _after_comma(text, i)
            if after is None:
                return None
            i = after
        first = False
        if text[i] != '"':
            raise _Malformed("expected a key")
        key_end = _scan_string(text, i)
        if key_end is None:
            return None
        key = _loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text):
            return None
        if text[i] != ":":
            raise _Malformed("expected ':'")
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return None
        end = _scan_value(text, i)
        if key in ("arguments", "parameters"):
            _fill_v7_arguments(text, i, end, call)
        elif end is None:
            return None
        elif key == "name":
            call.name = _expect_str(_loads(text[i:end]), "name")
        elif key == "id":
            call.id = _expect_str(_loads(text[i:end]), "id")
        if end is None:
            return None
        i = end


def _fill_v7_arguments(text: str, start: int, end: int | None, call: _PartialCall) -> None:
    call.args_started = True
    if text[start] == '"':  # arguments given as a JSON-encoded string: emit once decoded
        call.args_streamable = False
        if end is not None:
            inner = _expect_str(_loads(text[start:end]), "arguments")
            _loads(inner)
            call.args, call.args_done = inner, True
        return
    if text[start] not in "{[":
        raise _Malformed("arguments must be an object")
    call.args = text[start : end if end is not None else len(text)]
    if end is not None:
        _loads(call.args)
        call.args_done = True


def _after_comma(text: str, i: int) -> int | None:
    """Index of the next item after the ',' at text[i]; None if the text ends first."""
    if text[i] != ",":
        raise _Malformed("expected ','")
    i = _skip_ws(text, i + 1)
    return i if i < len(text) else None


def _expect_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{what} must be a string")
    return value


def _scan_v7(text: str, i: int, calls: list[_PartialCall]) -> int | None:
    """Scan a v7 section (a JSON list of calls, or one call object) starting at text[i]."""
    if text[i] == "{":
        call = _PartialCall()
        calls.append(call)
        return _scan_v7_object(text, i, call)
    i, first = i + 1, len(calls)
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return None
        if text[i] == "]":
            if len(calls) == first:
                raise _Malformed("empty tool-call list")
            return i + 1
        if len(calls) > first:
            after = _after_comma(text, i)
            if after is None:
                return None
            i = after
        if text[i] != "{":
            raise _Malformed("expected a call object")
        call = _PartialCall()
        calls.append(call)
        end = _scan_v7_object(text, i, call)
        if end is None:
            return None
        i = end


def _scan_v11(text: str, i: int, calls: list[_PartialCall]) -> int | None:
    """Scan `name([CALL_ID]id)?[ARGS]{json}` starting at text[i]."""
    call = _PartialCall()
    calls.append(call)
    args_at = text.find(ARGS, i)
    head = text[i:] if args_at < 0 else text[i:args_at]
    name, _, call_id = head.partition(CALL_ID)
    if args_at < 0:
        _check_partial_name(name if CALL_ID in head else _strip_partial_marker(name))
        return None
    if not _NAME_RE.fullmatch(name.strip()):
        raise _Malformed("bad tool name")
    call.name, call.id, call.id_pending = name.strip(), call_id.strip() or None, False
    j = _skip_ws(text, args_at + len(ARGS))
    if j >= len(text):
        return None
    if text[j] != "{":
        raise _Malformed("arguments must be an object")
    end = _scan_value(text, j)
    call.args_started = True
    call.args = text[j : end if end is not None else len(text)]
    if end is None:
        return None
    _loads(call.args)
    call.args_done = True
    return end


def _check_partial_name(name: str) -> None:
    stripped = name.lstrip()
    if stripped and not _NAME_RE.fullmatch(stripped):
        raise _Malformed("bad tool name")


def _strip_partial_marker(text: str) -> str:
    """Drop a suffix of `text` that could be the start of `[ARGS]` or `[CALL_ID]`."""
    for k in range(min(len(text), len(CALL_ID)), 0, -1):
        if ARGS.startswith(text[-k:]) or CALL_ID.startswith(text[-k:]):
            return text[:-k]
    return text


def _held_back(text: str) -> int:
    """Length of the longest suffix of `text` that could start a `[TOOL_CALLS]` marker."""
    for k in range(min(len(text), len(TOOL_CALLS) - 1), 0, -1):
        if TOOL_CALLS.startswith(text[-k:]):
            return k
    return 0


def _scan(text: str, final: bool) -> _Scan:
    """Scan the whole output so far; raises _Malformed on text that cannot be a tool call."""
    content: list[str] = []
    calls: list[_PartialCall] = []
    i = 0
    while True:
        marker = text.find(TOOL_CALLS, i)
        if marker < 0:
            tail = text[i:]
            content.append(tail if final else tail[: len(tail) - _held_back(tail)])
            return _Scan("".join(content), calls)
        content.append(text[i:marker])
        j = _skip_ws(text, marker + len(TOOL_CALLS))
        if j >= len(text):
            end = None
        elif text[j] in "[{":
            end = _scan_v7(text, j, calls)
        else:
            end = _scan_v11(text, marker + len(TOOL_CALLS), calls)
        if end is None:
            if final:
                raise _Malformed("unfinished tool call")
            return _Scan("".join(content), calls)
        i = end


def _before_marker(text: str) -> str:
    """The plain text before the first tool-call marker (all of it when there is none)."""
    marker = text.find(TOOL_CALLS)
    return text if marker < 0 else text[:marker]


class ToolCallStreamParser:
    """Feeds text deltas of one choice; returns content and OpenAI tool-call deltas."""

    def __init__(self, id_factory: Callable[[], str] = generate_tool_call_id):
        self._id_factory = id_factory
        self._text = ""
        self._content_sent = 0
        self._ids: list[str] = []  # ids of the calls whose first delta was sent
        self._args_sent: list[int] = []
        self._failed = False  # malformed: nothing more is sent

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._ids)

    def feed(self, delta: str) -> StreamDelta:
        self._text += delta
        return self._step(final=False)

    def finish(self) -> StreamDelta:
        """Flush held-back text at the end of generation."""
        return self._step(final=True)

    def _step(self, final: bool) -> StreamDelta:
        if self._failed:
            return StreamDelta()
        try:
            scan = _scan(self._text, final)
        except _Malformed:
            return self._fail()
        out = StreamDelta(content=scan.content[self._content_sent :])
        self._content_sent = len(scan.content)
        for index, call in enumerate(scan.calls):
            out.tool_calls.extend(self._call_deltas(index, call, final))
        return out

    def _call_deltas(self, index: int, call: _PartialCall, final: bool) -> list[dict]:
        deltas = []
        if index == len(self._ids):
            ready = call.name is not None and (call.args_started or not call.id_pending)
            if not ready:
                return []
            self._ids.append(call.id or self._id_factory())
            self._args_sent.append(0)
            deltas.append(
                {
                    "index": index,
                    "id": self._ids[index],
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            )
        if call.args_streamable or call.args_done:
            new = call.args[self._args_sent[index] :]
            if new:
                self._args_sent[index] = len(call.args)
                deltas.append({"index": index, "function": {"arguments": new}})
        return deltas

    def _fail(self) -> StreamDelta:
        # With no call sent yet, the content sent is a prefix of the text before the first
        # marker: send the rest of that prefix, as the whole-text parse keeps it. Once calls
        # went out they cannot be taken back. Either way nothing after the failure is sent.
        self._failed = True
        if self._ids:
            return StreamDelta()
        return StreamDelta(content=_before_marker(self._text)[self._content_sent :])


def parse_tool_calls(
    text: str, id_factory: Callable[[], str] = generate_tool_call_id
) -> ParsedToolOutput:
    """Parse a whole model output; malformed tool-call text is dropped with what follows it."""
    try:
        scan = _scan(text, final=True)
    except _Malformed:
        return ParsedToolOutput(content=_before_marker(text) or None, tool_calls=[])
    calls = [ToolCall(c.id or id_factory(), c.name or "", c.args) for c in scan.calls]
    return ParsedToolOutput(content=scan.content or None, tool_calls=calls)
