"""The OpenAI-compatible HTTP app: routes, SSE streaming, errors, auth and Prometheus metrics.

All the work is done by `ChatService`; this module maps HTTP onto it. Every user error comes
back as OpenAI's `{"error": {...}}` body with a 4xx status; a client that goes away aborts its
engine request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from mistralpy.api.chat import ChatService, NotFound, new_request_id
from mistralpy.engine.errors import EngineDeadError
from mistralpy.errors import UserError
from mistralpy.server.chat_page import install_chat_page
from mistralpy.server.protocol import (
    ERROR_RESPONSES,
    MAX_BODY_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_plain_json,
    error_body,
    to_service_body,
)
from mistralpy.server.responses import (
    EventStream,
    ResponseNotFound,
    ResponsesRequest,
    ResponseStore,
    responses_errors,
    responses_errors_stream,
    start_turn,
)
from mistralpy.server.transport import AdmissionState, TransportGuard, TransportLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # when set, every route but /health needs `Bearer <key>`
    # generation requests waiting to run (vLLM's sense: admitted, not in the running batch and
    # with no free batch slot) beyond which new ones get a 429; None: no limit
    max_queue_len: int | None = None
    send_stall_timeout_s: float = 60.0  # a client reading nothing this long is dropped


class ServerMetrics:
    """Prometheus metrics in a registry owned by one app (no process-global state)."""

    def __init__(self, stats: Callable[[], dict[str, float]] | None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mistralpy_requests", "HTTP requests", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("mistralpy_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "mistralpy_generation_tokens", "Generated tokens", registry=r
        )
        self.spec_decode = {  # vLLM's spec-decode counters, from each finished request's usage
            key: Counter(f"mistralpy_spec_decode_{key}", help_text, registry=r)
            for key, help_text in (
                ("num_drafts", "Speculative verify steps"),
                ("num_draft_tokens", "Drafted tokens verified"),
                ("num_accepted_tokens", "Drafted tokens accepted"),
            )
        }
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "mistralpy_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r
        )
        self.itl = Histogram(
            "mistralpy_inter_token_latency_seconds",
            "Gap between chunks",
            buckets=buckets,
            registry=r,
        )
        self.kv_usage = Gauge("mistralpy_kv_cache_usage_ratio", "KV blocks in use", registry=r)
        self.waiting = Gauge("mistralpy_num_requests_waiting", "Queue length", registry=r)
        self.running = Gauge("mistralpy_num_requests_running", "Running requests", registry=r)
        self._stats = stats

    def record_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage["prompt_tokens"])
            self.generation_tokens.inc(usage["completion_tokens"])
            for key, counter in self.spec_decode.items():
                counter.inc(usage.get("speculative", {}).get(key, 0))

    def render(self) -> bytes:
        if self._stats is not None:
            s = self._stats()
            self.kv_usage.set(s.get("kv_cache_usage", 0.0))
            self.waiting.set(s.get("num_waiting", 0))
            self.running.set(s.get("num_running", 0))
        return generate_latest(self.registry)


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def error_response(exc: BaseException) -> JSONResponse:
    """Map an exception from the service to an OpenAI error response."""
    if isinstance(exc, NotFound):
        return _error(404, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, UserError):  # every user mistake, and nothing else
        param = getattr(exc, "param", None)
        code = getattr(exc, "code", None)
        message = getattr(exc, "message", None) or str(exc)
        return _error(400, message, "invalid_request_error", param, code)
    if isinstance(exc, EngineDeadError):  # the server is going down: retry elsewhere
        return _error(503, "the engine is not running", "service_unavailable", None, None)
    # The exception's text is for the log (the transport guard logs it), not for the client.
    return _error(500, "internal server error", "internal_error", None, None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "We could not parse the JSON body of your request.", None
    # A union reports one error per member; the deepest location is the most telling.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_type_tag(part: object) -> bool:
    """Pydantic puts union member names (`list[ChatMessage]`, `str`) into error locations."""
    text = str(part)
    return "[" in text or text in _TYPE_TAGS or text[:1].isupper() or "-" in text


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def create_app(
    service: ChatService,
    settings: ServerSettings | None = None,
    stats: Callable[[], dict[str, float]] | None = None,
) -> FastAPI:
    """The FastAPI app serving `service`; `stats` feeds the KV-cache and queue gauges."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(stats)
    app = FastAPI(title="mistralpy", version="0.1.0", responses=ERROR_RESPONSES)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.service = service
    app.state.metrics = metrics
    app.state.admission = AdmissionState(batch_room(stats))
    _install_middleware(app, settings, metrics, app.state.admission)
    _install_error_handlers(app)
    _install_routes(app, service, metrics)
    app.state.responses = _install_responses_routes(app, service, metrics)
    install_chat_page(app)
    return app


def batch_room(stats: Callable[[], dict[str, float]] | None) -> Callable[[], int]:
    """Requests the engine's running batch holds or has a free slot for; admitted generation
    requests beyond these are waiting (what --max-queue-len bounds). Without stats: 0, so the
    limit then counts every request in flight."""

    def room() -> int:
        if stats is None:
            return 0
        s = stats()
        free_slots = max(0, int(s.get("max_num_seqs", 0)) - int(s.get("num_running", 0)))
        return int(s.get("num_running_requests", 0)) + free_slots

    return room


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without its 422 responses: validation errors are answered 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _install_middleware(
    app: FastAPI, settings: ServerSettings, metrics: ServerMetrics, admission: AdmissionState
) -> None:
    def on_response(scope: dict, status: int) -> None:
        route = scope.get("route")
        metrics.requests.labels(route.path if route is not None else "unmatched", str(status)).inc()

    limits = TransportLimits(
        max_body_bytes=MAX_BODY_BYTES,
        api_key=settings.api_key,
        max_queue_len=settings.max_queue_len,
        send_stall_timeout_s=settings.send_stall_timeout_s,
    )
    app.add_middleware(
        TransportGuard,
        limits=limits,
        admission=admission,
        map_error=_mapped_error,
        on_response=on_response,
    )


def _mapped_error(exc: BaseException) -> tuple[int, bytes]:
    response = error_response(exc)
    return response.status_code, bytes(response.body)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param, None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)


def _install_routes(app: FastAPI, service: ChatService, metrics: ServerMetrics) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])  # health checkers often send HEAD
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(service)]}

    # `:path`: ids hold slashes (`mistralai/Mistral-Small-3.1-24B-Instruct-2503`, local paths)
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        service.check_model(model_id)
        return {**_model_card(service), "id": model_id}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> Response:
        body = _service_body(req)
        request_id = new_request_id("chatcmpl")
        if req.stream:
            chunks = service.stream_chat_completion(body, request_id)
            return await _stream(chunks, request_id, metrics)
        return await _whole(service.create_chat_completion(body, request_id), metrics)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        body = _service_body(req)
        request_id = new_request_id("cmpl")
        if req.stream:
            chunks = service.stream_completion(body, request_id)
            return await _stream(chunks, request_id, metrics)
        return await _whole(service.create_completion(body, request_id), metrics)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        return await service.tokenize(_service_body(req))

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        return service.detokenize(_service_body(req))


def _install_responses_routes(
    app: FastAPI, service: ChatService, metrics: ServerMetrics
) -> ResponseStore:
    """`/v1/responses` (create, retrieve, delete): a turn runs as a chat request; returns the
    app's store of responses."""
    store = ResponseStore()

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest) -> Response:
        _service_body(req)  # checked as sent: an error names the Responses field
        turn = start_turn(req, store, service.served_model_name)
        if req.stream:
            chunks = responses_errors_stream(service.stream_chat_completion(turn.body, turn.id))
            return await _stream(chunks, turn.id, metrics, EventStream(turn))
        whole = responses_errors(service.create_chat_completion(turn.body, turn.id))
        return await _whole(whole, metrics, turn.whole)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> dict:
        return store.find(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        if not store.delete(response_id):
            raise ResponseNotFound(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return store


def _model_card(service: ChatService) -> dict:
    return {
        "id": service.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "mistralpy",
        "max_model_len": service.max_model_len,
    }


def _service_body(req: BaseModel) -> dict:
    """The service's dict of a parsed request, refused (400) if a layer below cannot take it."""
    body = to_service_body(req)
    check_plain_json(body)
    return body


async def _whole(
    coro: Awaitable[dict], metrics: ServerMetrics, shape: Callable[[dict], dict] = lambda r: r
) -> JSONResponse:
    """Run a non-streaming request; the client gets `shape` of its result. A client that goes
    away cancels this route (the transport guard watches for it), and the cancellation aborts
    the engine request."""
    try:
        result = await coro
    except UserError as exc:  # a user error: the usual 4xx
        return error_response(exc)
    usage = result.get("usage")
    metrics.record_usage(usage)
    if usage:
        metrics.ttft.observe(usage["total_time_sec"] - usage["total_completion_time_sec"])
    return JSONResponse(shape(result))


class SseFrames(Protocol):
    """How a stream of chunks is sent: chat's `data:` lines, or the Responses API's events."""

    def start(self) -> list[bytes]: ...
    def chunk(self, chunk: dict) -> list[bytes]: ...
    def end(self) -> list[bytes]: ...
    def fail(self, error: dict) -> list[bytes]: ...


class ChunkFrames:
    """Chat and text completions: each chunk as `data:`, an error in-band, then `[DONE]`."""

    def start(self) -> list[bytes]:
        return []

    def chunk(self, chunk: dict) -> list[bytes]:
        return [_sse(chunk)]

    def end(self) -> list[bytes]:
        return [_sse("[DONE]")]

    def fail(self, error: dict) -> list[bytes]:
        return [_sse(error), _sse("[DONE]")]


async def _stream(
    chunks: AsyncGenerator[dict, None],
    request_id: str,
    metrics: ServerMetrics,
    frames: SseFrames | None = None,
) -> Response:
    """SSE response; errors before the first chunk become a normal error response."""
    start = time.monotonic()
    try:
        first = await chunks.__anext__()
    except Exception as exc:  # noqa: BLE001 - mapped to an HTTP error, nothing escapes
        await chunks.aclose()
        _log_unexpected(exc, request_id)
        return error_response(exc)
    return _EventStream(
        _sse_body(first, chunks, request_id, metrics, start, frames or ChunkFrames()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
    )


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends: a send
    that raises (client gone, client stalled) leaves it suspended otherwise, its engine
    request running until garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # starlette types body_iterator as any AsyncIterable; ours is always the
            # _sse_body generator given to the constructor, which has aclose
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _sse_body(
    first: dict,
    chunks: AsyncGenerator[dict, None],
    request_id: str,
    metrics: ServerMetrics,
    start: float,
    frames: SseFrames,
) -> AsyncIterator[bytes]:
    last_time: float | None = None
    usage = first.get("usage")
    try:
        for data in frames.start() + frames.chunk(first):
            yield data
        async for chunk in chunks:
            now = time.monotonic()
            if last_time is None:
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe(now - last_time)
            last_time = now
            usage = chunk.get("usage") or usage
            for data in frames.chunk(chunk):
                yield data
        ending = frames.end()
    except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
        _log_unexpected(exc, request_id)
        ending = frames.fail(error_response_body(exc))
    finally:
        await chunks.aclose()  # early (client gone): the engine aborts the request
    metrics.record_usage(usage)
    for data in ending:
        yield data


def _log_unexpected(exc: BaseException, request_id: str) -> None:
    """Log what is not the user's fault: its text goes to the log, not to the client."""
    if not isinstance(exc, UserError):
        logger.error("request %s failed", request_id, exc_info=exc)


def error_response_body(exc: BaseException) -> dict:
    body: dict = json.loads(bytes(error_response(exc).body))  # error_body's dict, round-tripped
    return body
