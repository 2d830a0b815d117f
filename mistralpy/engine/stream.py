"""One request's outputs on their way from the engine thread to an asyncio reader.

A reader that stays connected but stops reading (a stalled HTTP client) must not make memory
grow: outputs that arrive while an earlier one is still unread are merged into it (the newest
cumulative fields, the deltas concatenated), so at most one output waits per request. A
reader that falls more than `max_unread` outputs behind is cut off: its stream ends with
`ReaderTooSlowError` and `on_overrun` aborts the request, freeing its engine slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from mistralpy.engine.errors import ReaderTooSlowError
from mistralpy.engine.sequence import CompletionOutput, RequestOutput


def merge_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` (cumulative fields, finished, metrics) carrying the deltas of both."""
    previous = {o.index: o for o in old.outputs}
    merged = [_merge_completion(previous.get(o.index), o) for o in new.outputs]
    return replace(new, outputs=merged)


def _merge_completion(old: CompletionOutput | None, new: CompletionOutput) -> CompletionOutput:
    if old is None:
        return new
    return replace(
        new,
        delta_text=old.delta_text + new.delta_text,
        delta_token_ids=old.delta_token_ids + new.delta_token_ids,
    )


class OutputStream:
    """Outputs of one request; `put` and `get` run on the reader's event loop."""

    def __init__(self, max_unread: int, on_overrun: Callable[[], None]):
        self._max_unread = max_unread
        self._on_overrun = on_overrun
        self._pending: RequestOutput | BaseException | None = None
        self._unread = 0  # outputs merged into `_pending` since the last get
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand over an output (merged into an unread one) or the request's failure."""
        if isinstance(self._pending, BaseException):
            return  # the stream already ended in an error; later outputs are moot
        if isinstance(item, BaseException) or self._pending is None:
            self._pending = item
        else:
            self._pending = merge_outputs(self._pending, item)
        self._unread += 1
        if self._unread > self._max_unread and _unfinished(self._pending):
            self._pending = ReaderTooSlowError(self._max_unread)
            self._on_overrun()
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        """The next output (everything since the last get, merged) or the failure."""
        await self._ready.wait()
        self._ready.clear()
        item, self._pending, self._unread = self._pending, None, 0
        assert item is not None
        return item


def _unfinished(item: RequestOutput | BaseException | None) -> bool:
    """An output of a request still running (a finished one costs nothing more to hold)."""
    return isinstance(item, RequestOutput) and not item.finished
