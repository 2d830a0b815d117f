"""OpenAI request schemas (pydantic, strict types) and the OpenAI error body.

The models check shapes and types only; value ranges are checked once, by `SamplingParams`
and the chat service, so the Python API and the server reject the same things.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistralpy.errors import UserError

# Request bodies beyond this are refused before parsing (413); images come as URLs or base64.
MAX_BODY_BYTES = 64 * 1024 * 1024
# JSON nesting beyond this (e.g. a tool's `parameters` schema) is refused: templates, schema
# compilers and pydantic recurse over it, and Python's recursion limit is ~1000 frames.
MAX_JSON_DEPTH = 64


class _Strict(BaseModel):
    # strict: "5" is not an int; unknown fields are ignored like OpenAI-compatible servers do.
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str  # mistral.rs also accepts the URL as a bare string


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer = system
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(_Strict):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Grammar(_Strict):
    """mistral.rs' grammar field; `value` is the pattern, Lark text, schema or choice list."""

    type: Literal["regex", "json_schema", "json_object", "lark", "llguidance", "choice"]
    value: Any = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    grammar: Grammar | None = None
    # vLLM's spellings of the same constraints (at most one constraint per request)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: llguidance serves all


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields):
    # one prompt (text or token ids) or a batch of them: one choice per prompt (x n)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # counted as the chat would render them
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = True


def to_service_body(req: BaseModel) -> dict:
    """The plain dict the chat service takes: set fields only, JSON names (schema, not schema_)."""
    body = req.model_dump(exclude_none=True, by_alias=True)
    for m in body.get("messages", []) if isinstance(body.get("messages"), list) else []:
        for part in m.get("content", []) if isinstance(m.get("content"), list) else []:
            if part.get("type") == "image_url" and isinstance(part["image_url"], str):
                part["image_url"] = {"url": part["image_url"]}
    return body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, as the OpenAPI document describes it."""

    error: ErrorDetail


# What every route may answer besides 200, each with an OpenAI error body: the OpenAPI
# document lists these (not FastAPI's default 422, which the server never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (also malformed JSON)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model or route"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class UnsafeValue(UserError):
    """A string or nesting the layers below cannot take (HTTP 400)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def check_plain_json(body: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse text with lone UTF-16 surrogates (JSON allows `"\\ud800"`; no tokenizer can
    encode it) and nesting deeper than `max_depth`. Iterative: deep input cannot recurse."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            raise UnsafeValue(f"{path or 'body'}: nested deeper than {max_depth} levels", path)
        if isinstance(value, str):
            if not value.isascii() and _has_surrogate(value):
                message = f"{path or 'body'}: text contains a lone UTF-16 surrogate"
                raise UnsafeValue(message, path or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path, depth + 1))
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
