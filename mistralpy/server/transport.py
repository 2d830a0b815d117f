"""The HTTP transport guard: a pure ASGI middleware between uvicorn and the routes.

Pure ASGI (not `@app.middleware("http")`, whose BaseHTTPMiddleware hides the client's
disconnect from the route) so that it can:
- refuse before any work: a bad API key (401), a `Content-Length` over the cap (413), a full
  queue of requests waiting to run (429 with `Retry-After`), a server that is draining (503);
- count the body as it arrives and stop a chunked body at the cap (413);
- watch for the client's disconnect once the body is read and cancel the route then: a
  cancelled route aborts its engine request, whatever the route (streaming or not);
- map any exception a route lets out to an OpenAI error body on a connection that stays
  usable (Starlette's catch-all handler logs and re-raises, and uvicorn then resets it);
- end streams cut by shutdown with an in-band error event instead of a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from mistralpy.server.protocol import error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes that start generation: the ones admission control counts.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Routes that stay open without an API key and through a drain (load balancers probe them).
OPEN_PATHS = ("/health", "/")  # "/": the chat page, which asks for the key itself


@dataclass(frozen=True)
class TransportLimits:
    """What one app accepts from its clients."""

    max_body_bytes: int  # request bodies beyond this are refused (413), chunked or not
    api_key: str | None = None  # when set, every route but OPEN_PATHS needs `Bearer <key>`
    # generation requests waiting beyond this (in flight, less AdmissionState.batch_room): 429
    max_queue_len: int | None = None
    retry_after_s: int = 1  # the `Retry-After` of a 429/503
    # a client that reads nothing of its response for this long is dropped: its route (and
    # so its engine request) is cancelled and the connection closed
    send_stall_timeout_s: float = 60.0


class ClientStalled(Exception):
    """The client stopped reading its response (the send buffer stayed full)."""


class AdmissionState:
    """Generation requests in flight and whether the server is draining (owned by one app).

    batch_room: how many requests the engine's running batch holds or has free slots for;
    the requests in flight beyond it are the queue that `max_queue_len` bounds."""

    def __init__(self, batch_room: Callable[[], int] = lambda: 0) -> None:
        self.in_flight = 0
        self.batch_room = batch_room
        self.draining = False  # shutdown started: new requests get a 503
        self._drain_over = False  # the drain time is up: routes still running end
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}

    def drain_over(self) -> asyncio.Event:
        """The running loop's "drain is over" event. One per loop: an asyncio.Event binds to
        the first loop that waits on it, and a test client may run each request on its own."""
        loop = asyncio.get_running_loop()
        event = self._events.get(loop)
        if event is None:
            self._events = {lp: ev for lp, ev in self._events.items() if not lp.is_closed()}
            event = self._events[loop] = asyncio.Event()
            if self._drain_over:
                event.set()
        return event

    def end_drain(self) -> None:
        self._drain_over = True
        for event in self._events.values():
            event.set()


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """A whole OpenAI error response."""
    await send_json(
        send, status, json.dumps(error_body(message, type_, None, code)).encode(), headers
    )


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """A whole JSON response with its length (the connection stays reusable)."""
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Receiver:
    """The app's `receive`: counts body bytes against the cap; once the body is complete it
    watches for the client's disconnect and calls `on_disconnect` (cancel the route)."""

    def __init__(self, receive: Receive, max_body_bytes: int, on_disconnect: Callable[[], Any]):
        self._receive = receive
        self._max = max_body_bytes
        self._on_disconnect = on_disconnect
        self.received = 0
        self.disconnected = asyncio.Event()
        self._watch: asyncio.Task | None = None

    async def __call__(self) -> Message:
        if self._watch is not None:  # after the body only a disconnect can come
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._mark_disconnected()
        elif message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._max:
                raise HTTPException(413, "request body too large")
            if not message.get("more_body", False):
                self._watch = asyncio.ensure_future(self._watch_disconnect())
        return message

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._mark_disconnected()
                return

    def _mark_disconnected(self) -> None:
        if not self.disconnected.is_set():
            self.disconnected.set()
            self._on_disconnect()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class _Sender:
    """The app's `send`: remembers the status and whether the body was started or ended."""

    def __init__(self, send: Send, stall_timeout_s: float):
        self._send = send
        self._stall_timeout_s = stall_timeout_s
        self.status: int | None = None
        self.streaming = False  # text/event-stream: a shutdown ends it with an error event
        self.ended = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers", []))
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        try:  # uvicorn's send waits only while the socket's buffer is full
            await asyncio.wait_for(self._send(message), self._stall_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ClientStalled() from None

    async def end_stream_with_error(self, message: str) -> None:
        """Close an SSE body that the route can no longer finish."""
        event = json.dumps(error_body(message, "server_error", None, "server_shutdown"))
        body = f"data: {event}\n\ndata: [DONE]\n\n".encode()
        with contextlib.suppress(OSError):
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
        self.ended = True


class TransportGuard:
    """The pure ASGI middleware described in the module docstring."""

    def __init__(
        self,
        app: App,
        limits: TransportLimits,
        admission: AdmissionState,
        map_error: Callable[[BaseException], tuple[int, bytes]],
        on_response: Callable[[Scope, int], None] = lambda scope, status: None,
    ):
        self.app = app
        self.limits = limits
        self.admission = admission
        self._map_error = map_error
        self._on_response = on_response
        self._expected = limits.api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message, type_, code, headers = refusal
            await send_error(send, status, message, type_, code, headers)
            self._on_response(scope, status)
            return
        generation = scope["path"] in GENERATION_PATHS
        self.admission.in_flight += generation
        try:
            sender = await self._run(scope, receive, send)
        finally:
            self.admission.in_flight -= generation
        if sender.status is not None:
            self._on_response(scope, sender.status)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, str | None, list] | None:
        """(status, message, type, code, headers) of a request refused before the route."""
        headers = dict(scope.get("headers", []))
        path = scope["path"]
        if not self._authorized(headers, path):
            message = "Incorrect API key provided."
            return 401, message, "invalid_request_error", "invalid_api_key", []
        length = headers.get(b"content-length")
        if length is not None and (
            not length.isdigit() or int(length) > self.limits.max_body_bytes
        ):
            return 413, "request body too large", "invalid_request_error", None, []
        retry = [("retry-after", str(self.limits.retry_after_s))]
        if self.admission.draining and path not in OPEN_PATHS:
            return 503, "the server is shutting down", "server_error", "server_shutdown", retry
        limit = self.limits.max_queue_len
        if path in GENERATION_PATHS and limit is not None and self._waiting() >= limit:
            message = f"the queue of requests waiting to run is full ({limit}); retry later"
            return 429, message, "rate_limit_error", "queue_full", retry
        return None

    def _waiting(self) -> int:
        """Generation requests in flight that neither run nor have a free batch slot."""
        return max(0, self.admission.in_flight - self.admission.batch_room())

    def _authorized(self, headers: dict[bytes, bytes], path: str) -> bool:
        if not self._expected or path in OPEN_PATHS:
            return True
        header = headers.get(b"authorization", b"").decode("latin-1")
        return bearer_matches(header, self._expected)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> _Sender:
        """Run the route as a task that a disconnect or the end of a drain cancels; map what
        it raises."""
        sender = _Sender(send, self.limits.send_stall_timeout_s)
        # `task` is bound before the route can read its body, hence before any disconnect.
        receiver = _Receiver(receive, self.limits.max_body_bytes, lambda: task.cancel())
        task = asyncio.ensure_future(self.app(scope, receiver, sender))
        try:
            await self._until_done_or_drained(task)
        finally:
            receiver.close()
        if task.cancelled():
            if not receiver.disconnected.is_set():  # the drain is over, the client is there
                await self._cut_by_shutdown(sender)
        elif isinstance(task.exception(), ClientStalled):
            # nothing more can reach this client; returning with the response unfinished
            # makes uvicorn close the connection
            logger.info("dropped a client that stopped reading its response")
        elif (failure := task.exception()) is not None:
            await self._send_mapped(failure, sender)
        return sender

    async def _until_done_or_drained(self, task: asyncio.Task) -> None:
        """Wait for the route; cancel it if the drain ends first (or we are cancelled)."""
        over = asyncio.ensure_future(self.admission.drain_over().wait())
        try:
            await asyncio.wait({task, over}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            over.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _send_mapped(self, exc: BaseException, sender: _Sender) -> None:
        status, body = self._map_error(exc)
        if status >= 500:
            logger.error("request failed", exc_info=exc)
        if sender.status is None:
            await send_json(sender, status, body)
        elif sender.streaming and not sender.ended:
            await sender.end_stream_with_error("internal error")

    async def _cut_by_shutdown(self, sender: _Sender) -> None:
        if sender.status is None:
            with contextlib.suppress(OSError):
                await send_error(
                    sender, 503, "the server is shutting down", "server_error", "server_shutdown"
                )
        elif sender.streaming and not sender.ended:
            await sender.end_stream_with_error("the server shut down before this reply ended")


def bearer_matches(header: str, api_key: str) -> bool:
    """`Authorization: Bearer <key>` with the scheme in any case (RFC 7235), in constant time."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )
