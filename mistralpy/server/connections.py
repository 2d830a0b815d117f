"""Connection-level limits uvicorn lacks: header and body deadlines and a connection cap.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection
that never sends a byte, drips its headers or stops inside its body stays open forever; enough
of them exhaust the process's file descriptors (every request then fails, `/health` included).
`guarded_h11` gives each request a deadline for its headers and one for its body, and refuses
connections beyond a cap at once. While the route runs (generation may take minutes) no
deadline applies: the transport guard handles clients that leave.

`RepeatFilter` throttles a logger that repeats itself (asyncio logs every failed accept).
`DrainingServer` refuses new requests (503) once shutdown starts; uvicorn's
`timeout_graceful_shutdown` bounds the drain, after which the transport guard ends the
streams still running with an error event.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mistralpy.server.transport import AdmissionState


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # from connect (or the first byte after keep-alive) to headers
    body_timeout_s: float = 60.0  # from the headers to the end of the body
    max_connections: int = 1024  # open connections beyond this are closed on accept


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits` applied (pass as `uvicorn.Config(http=...)`)."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: str | None = None  # "headers" | "body" | None (the route runs, or idle)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.abort()  # refused before it costs more than the accept
                return
            self._arm("headers", limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._phase is None and self.conn.their_state is h11.IDLE:
                self._arm("headers", limits.header_timeout_s)  # a new request on keep-alive
            super().data_received(data)
            self._follow_state()

        def on_response_complete(self) -> None:
            self._disarm()  # idle now: uvicorn's keep-alive timeout takes over
            super().on_response_complete()

        def _follow_state(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase != "body":
                self._arm("body", limits.body_timeout_s)
            elif state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in: the route has it

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _expire(self) -> None:
            self._deadline, self._phase = None, None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class RepeatFilter(logging.Filter):
    """Lets a message through at most `burst` times per `window_s` seconds (per message
    template); says how many were dropped when it lets one through again."""

    def __init__(self, burst: int = 5, window_s: float = 60.0):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int, int]] = {}  # msg -> (window start, count, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        start, count, dropped = self._seen.get(key, (now, 0, 0))
        if now - start > self.window_s:
            start, count = now, 0
        if count >= self.burst:
            self._seen[key] = (start, count, dropped + 1)
            return False
        if dropped:
            record.msg = f"{record.msg} ({dropped} like it suppressed)"
        self._seen[key] = (start, count + 1, 0)
        return True


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded drain: once shutdown starts, new requests get a 503;
    after `drain_s` the routes still running end (streams with an error event and [DONE])
    and their connections close cleanly, before the process exits. uvicorn's own
    `timeout_graceful_shutdown`, later than `drain_s`, only backs this up."""

    def __init__(self, config: uvicorn.Config, admission: AdmissionState, drain_s: float):
        super().__init__(config)
        self.admission = admission
        self.drain_s = drain_s

    async def shutdown(self, sockets: list | None = None) -> None:
        self.admission.draining = True
        timer = asyncio.get_running_loop().call_later(self.drain_s, self.admission.end_drain)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
