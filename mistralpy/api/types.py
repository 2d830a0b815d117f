"""The public types of the mistral.rs-shaped Python API: model selectors, requests, responses.

Requests are plain dataclasses that turn into the OpenAI-shaped dicts the chat service takes;
responses wrap the service's dicts so that `res.choices[0].message.content` and
`print(res.usage)` work as in mistral.rs.
"""

from __future__ import annotations

import base64
import enum
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class VisionArchitecture(str, enum.Enum):
    Mistral3 = "mistral3"


class MultimodalArchitecture(str, enum.Enum):
    Mistral3 = "mistral3"


class Architecture(str, enum.Enum):
    Llama = "llama"
    Mistral = "mistral"
    Mistral3 = "mistral3"


class IsqType(str, enum.Enum):
    """ISQ formats, named as mistral.rs names them (values are our format names)."""

    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q2K = "q2k"
    Q3K = "q3k"
    Q4K = "q4k"
    Q5K = "q5k"
    Q6K = "q6k"
    Q8K = "q8k"
    FP8 = "fp8"
    F8E4M3 = "fp8"  # mistral.rs's name for the same format (an alias of FP8)


class ModelDType(str, enum.Enum):
    Auto = "auto"
    BF16 = "bfloat16"
    F16 = "float16"
    F32 = "float32"


class TextMessageRole(str, enum.Enum):
    User = "user"
    Assistant = "assistant"
    System = "system"
    Tool = "tool"


class ToolChoice(str, enum.Enum):
    NoTools = "none"
    Auto = "auto"
    Required = "required"


def dtype_name(dtype: ModelDType | str | None) -> str:
    """Our dtype string ("auto", "bfloat16", ...) from mistral.rs spellings ("bf16", ModelDType)."""
    if dtype is None:
        return "auto"
    raw = dtype.value if isinstance(dtype, ModelDType) else str(dtype).lower()
    aliases = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16", "f32": "float32"}
    return aliases.get(raw, raw)


@dataclass(frozen=True)
class ModelSelector:
    """What `Which.*` builds: where the weights are and how to load them."""

    model_id: str
    arch: str | None = None
    tokenizer_json: str | None = None
    dtype: str = "auto"
    kind: str = "multimodal"
    mmproj: str | None = None  # GGUF: llama.cpp's vision file (Pixtral encoder + projector)


class Which:
    """mistral.rs's model selectors: the mistral3 checkpoint layouts, text-only decoders
    (HF `llama` / `mistral` layout) and GGUF files."""

    @staticmethod
    def VisionPlain(  # noqa: N802 - mistral.rs spelling
        model_id: str,
        arch: VisionArchitecture | str = VisionArchitecture.Mistral3,
        tokenizer_json: str | None = None,
        dtype: ModelDType | str | None = None,
    ) -> ModelSelector:
        return ModelSelector(model_id, _arch(arch), tokenizer_json, dtype_name(dtype), "vision")

    @staticmethod
    def MultimodalPlain(  # noqa: N802
        model_id: str,
        arch: MultimodalArchitecture | str | None = None,
        tokenizer_json: str | None = None,
        dtype: ModelDType | str | None = None,
    ) -> ModelSelector:
        return ModelSelector(model_id, _arch(arch), tokenizer_json, dtype_name(dtype))

    @staticmethod
    def Plain(  # noqa: N802
        model_id: str,
        arch: Architecture | str | None = None,
        tokenizer_json: str | None = None,
        dtype: ModelDType | str | None = None,
    ) -> ModelSelector:
        return ModelSelector(model_id, _arch(arch), tokenizer_json, dtype_name(dtype), "text")

    @staticmethod
    def GGUF(  # noqa: N802
        quantized_model_id: str,
        quantized_filename: str | list[str],
        tok_model_id: str | None = None,
        dtype: ModelDType | str | None = None,
        mmproj: str | None = None,
    ) -> ModelSelector:
        """A GGUF model: file `quantized_filename` (the first shard when a list) in the local
        directory or hub repo `quantized_model_id`. Its tokenizer and chat template come from
        the file's metadata; `tok_model_id` (a tokenizer.json) overrides the tokenizer.
        mmproj: llama.cpp's vision file (a path) for Mistral Small 3.1: images work."""
        files = [quantized_filename] if isinstance(quantized_filename, str) else quantized_filename
        model_id = gguf_model_id(quantized_model_id, files[0] if files else "")
        return ModelSelector(model_id, None, tok_model_id, dtype_name(dtype), "gguf", mmproj)


def gguf_model_id(model_dir: str, filename: str) -> str:
    """mistral.rs's GGUF pair (directory or hub repo, file name) as one model id."""
    if not filename.endswith(".gguf"):
        raise ValueError(f"the GGUF file name must end in .gguf, got {filename!r}")
    return f"{model_dir.rstrip('/')}/{filename}"


def _arch(arch: Any) -> str | None:
    if arch is None:
        return None
    name = arch.value if isinstance(arch, enum.Enum) else str(arch).lower()
    if name not in ("mistral3", "mistral", "llama"):
        raise ValueError(
            f"arch {name!r} is not supported: mistralpy serves mistral3, mistral, llama"
        )
    return name


@dataclass
class ChatCompletionRequest:
    """mistral.rs's chat request; `to_body()` gives the OpenAI body the service takes."""

    messages: list[dict] | str
    model: str = "default"
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    temperature: float | None = None
    stop_seqs: list[str] | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n_choices: int = 1
    stream: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    tool_schemas: list[str] | None = None  # JSON strings of OpenAI tool objects (mistral.rs)
    tools: list[dict] | None = None  # or the tool dicts themselves
    tool_choice: ToolChoice | str | dict | None = None
    response_format: dict | None = None
    grammar: Any = None
    grammar_type: str | None = None  # regex | json_schema | lark | llguidance

    def to_body(self) -> dict:
        body = _sampling_body(self)
        body["messages"] = self.messages
        body["logprobs"] = self.logprobs
        body["top_logprobs"] = self.top_logprobs
        tools = list(self.tools or []) + [json.loads(s) for s in self.tool_schemas or []]
        if tools:
            body["tools"] = tools
        if self.tool_choice is not None:
            tc = self.tool_choice
            body["tool_choice"] = tc.value if isinstance(tc, enum.Enum) else tc
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return _drop_none(body)


@dataclass
class CompletionRequest:
    """mistral.rs's text-completion request."""

    prompt: str
    model: str = "default"
    echo_prompt: bool = False
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    temperature: float | None = None
    stop_seqs: list[str] | None = None
    logit_bias: dict[int, float] | None = None
    n_choices: int = 1
    stream: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    grammar: Any = None
    grammar_type: str | None = None

    def to_body(self) -> dict:
        body = _sampling_body(self)
        body["prompt"] = self.prompt
        body["echo"] = self.echo_prompt
        return _drop_none(body)


def _sampling_body(req: ChatCompletionRequest | CompletionRequest) -> dict:
    # `model` is not forwarded: a Runner serves one model, whatever name the request uses.
    body: dict[str, Any] = {
        "max_tokens": req.max_tokens,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "temperature": req.temperature,
        "stop": req.stop_seqs,
        "logit_bias": req.logit_bias,
        "n": req.n_choices,
        "ignore_eos": req.ignore_eos,
        "seed": req.seed,
    }
    if req.grammar is not None:
        body["grammar"] = {"type": req.grammar_type or "regex", "value": req.grammar}
    return body


def _drop_none(body: dict) -> dict:
    return {k: v for k, v in body.items() if v is not None}


class Response:
    """Attribute view of a response dict: `res.choices[0].message.content`; prints readably."""

    def __init__(self, data: dict, kind: str = "Response"):
        self._data = data
        self._kind = kind

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("_data", {})
        if name not in data and name in _OPTIONAL.get(self.__dict__.get("_kind", ""), ()):
            return None
        if name not in data:
            raise AttributeError(f"{self._kind} has no field {name!r}")
        return _wrap(data[name], _KINDS.get(name, name.capitalize()))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def to_dict(self) -> dict:
        return self._data

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_wrap(v, _KINDS.get(k, k))!r}" for k, v in self._data.items())
        return f"{self._kind}({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Response) and self._data == other._data


_KINDS = {
    "choices": "Choice",
    "message": "ResponseMessage",
    "delta": "Delta",
    "usage": "Usage",
    "tool_calls": "ToolCallResponse",
    "function": "CalledFunction",
    "logprobs": "Logprobs",
}


# Fields mistral.rs's response classes always have, which our dicts leave out when empty.
_OPTIONAL = {
    "Delta": ("content", "role", "tool_calls", "reasoning_content"),
    "ResponseMessage": ("content", "tool_calls", "reasoning_content"),
    "Choice": ("logprobs", "finish_reason", "delta", "message", "text"),
    "ChatCompletionChunkResponse": ("usage",),
    "CompletionChunkResponse": ("usage",),
}


def _wrap(value: Any, kind: str) -> Any:
    if isinstance(value, dict):
        return Response(value, kind)
    if isinstance(value, list):
        return [_wrap(v, kind) for v in value]
    return value


# --- message builders ------------------------------------------------------------------


# Reply limit of the interactive entry points (`mistralpy run`, built models) when a request
# sets none: a random or looping model otherwise writes until the context is full (26,938
# tokens in 350 s for the README example). The HTTP server keeps OpenAI's "no limit".
DEFAULT_REPLY_MAX_TOKENS = 1024


@dataclass
class TextMessages:
    """`TextMessages().add_message(TextMessageRole.User, "hi")` → OpenAI messages.

    `max_tokens`: the reply limit of a request made of these messages (None: the model's
    default, DEFAULT_REPLY_MAX_TOKENS for a built model)."""

    messages: list[dict] = field(default_factory=list)
    max_tokens: int | None = None

    def set_max_tokens(self, max_tokens: int | None) -> TextMessages:
        self.max_tokens = max_tokens
        return self

    def add_message(self, role: TextMessageRole | str, text: str) -> TextMessages:
        self.messages.append({"role": _role(role), "content": text})
        return self

    def add_tool_message(self, content: str, tool_call_id: str) -> TextMessages:
        self.messages.append({"role": "tool", "content": content, "tool_call_id": tool_call_id})
        return self

    def clear(self) -> TextMessages:
        self.messages.clear()
        return self


@dataclass
class VisionMessages(TextMessages):
    """TextMessages plus `add_image_message(role, text, image, model)`."""

    def add_image_message(
        self, role: TextMessageRole | str, text: str, image: Any, model: Any = None
    ) -> VisionMessages:
        """`image`: PIL image, local path, URL, data URL, raw base64 or encoded bytes.

        `model` is accepted for mistral.rs compatibility (it checks the model takes images).
        """
        parts = [
            {"type": "image_url", "image_url": {"url": image_source(image)}},
            {"type": "text", "text": text},
        ]
        self.messages.append({"role": _role(role), "content": parts})
        return self


def _role(role: TextMessageRole | str) -> str:
    return role.value if isinstance(role, TextMessageRole) else str(role)


def image_source(image: Any) -> str:
    """A string image source (path, URL or data URL) for anything the Python API accepts."""
    if isinstance(image, (bytes, bytearray)):
        return "data:image/png;base64," + base64.b64encode(bytes(image)).decode()
    if isinstance(image, Path):
        return str(image)
    if isinstance(image, str):
        return image
    if hasattr(image, "save"):  # a PIL image: encode losslessly
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    raise TypeError(f"unsupported image type {type(image).__name__}")
