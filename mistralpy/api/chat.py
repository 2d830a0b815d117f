"""The chat service shared by the Python `Runner` and the HTTP server.

Takes OpenAI-shaped request bodies (plain dicts, already type-checked by the caller) and
returns OpenAI-shaped response dicts: chat completions, completions, their streamed chunks,
tokenize / detokenize. Prompt building (templating, image fetch + preprocessing) runs in a
worker thread so the event loop keeps serving other streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

from mistralpy.errors import UserError
from mistralpy.params import GrammarSpec, InvalidParameter, SamplingParams
from mistralpy.processing.tool_calls import TOOL_CALLS, ToolCallStreamParser, parse_tool_calls

if TYPE_CHECKING:  # the processing types load torch and PIL; this module must not
    from mistralpy.engine.sequence import (
        CompletionOutput,
        RequestMetrics,
        RequestOutput,
        TokenLogprob,
    )
    from mistralpy.processing.chat_template import ChatTemplate, ProcessedPrompt
    from mistralpy.processing.images import ImagePolicy, ImageProcessorConfig, ProcessedImage
    from mistralpy.processing.tokenizer import Tokenizer

_T = TypeVar("_T")

ROLES = ("system", "developer", "user", "assistant", "tool")
GRAMMAR_TYPES = ("regex", "json_schema", "lark", "llguidance", "json_object", "choice")
# vLLM's request fields -> grammar kind (`guided_grammar` is taken as Lark, as llguidance reads it)
GUIDED_KINDS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "lark",
}
# Logit bias that keeps tool_choice "none" from starting a call (a ban at any sane temperature)
NO_TOOL_CALL_BIAS = -100.0
# OpenAI's temperature range; SamplingParams allows more for direct engine users.
MAX_TEMPERATURE = 2.0
# Prompts in one /v1/completions batch (each is its own engine request, times n).
MAX_BATCH_PROMPTS = 64
# An output constraint (schema, regex, grammar, forced tools) longer than this as JSON text is
# refused: building its matcher grows faster than linearly (10,000 properties, 349 KB: ~8 s of
# a core). Real tool and response schemas are a few KB; OpenAI's own cap of 5,000 properties
# is about 170 KB in this form.
MAX_GRAMMAR_BYTES = 256 * 1024


class InvalidRequest(UserError):
    """The request as a whole is unusable; `param` names the field, `code` a machine code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class NotFound(UserError):
    """The request names something this server does not have (HTTP 404)."""

    def __init__(self, message: str, param: str | None, code: str):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(NotFound):
    """The request names a model this service does not serve."""

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", "model", "model_not_found")


class EngineRequestError(RuntimeError):
    """The engine failed this request (not the user's fault)."""


class PromptBuilder(Protocol):
    """Turns request content into a ProcessedPrompt (token ids + preprocessed images)."""

    # `stop`: set when the client has left; long work (downloads, tokenizing) ends at its
    # next check. Required: without it `tokenizers` encodes a long text in one call that holds
    # the GIL, and the event loop stops for its seconds (tests/server/test_hostile_prompt_cancel)

    async def load_images(
        self, messages: list[dict], stop: threading.Event
    ) -> dict[str, ProcessedImage]: ...

    def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        images: dict[str, ProcessedImage],
        stop: threading.Event,
    ) -> ProcessedPrompt: ...

    def text(self, prompt: str | list[int], stop: threading.Event) -> ProcessedPrompt: ...


class ChatEngine(Protocol):
    """What the service calls on the engine: engine.engine.AsyncEngine (tests: stand-ins)."""

    def generate(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs until the finished one; closing it early aborts it (the
        one way a request is aborted: every layer above just closes its stream)."""
        ...


# Image downloads and decodes at once, over all requests: their own pool, so that slow image
# URLs never hold the threads that template text-only chats (asyncio's default executor).
IMAGE_WORKERS = 4


@dataclass
class TemplatePrompts:
    """The real PromptBuilder: chat template + tokenizer + image loading under a policy."""

    tokenizer: Tokenizer
    template: ChatTemplate
    image_policy: ImagePolicy
    image_processor_config: ImageProcessorConfig | None  # None: a text-only model, no images
    image_pool: concurrent.futures.Executor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            IMAGE_WORKERS, thread_name_prefix="mistralpy-images"
        )
    )

    async def load_images(
        self, messages: list[dict], stop: threading.Event
    ) -> dict[str, ProcessedImage]:
        """source -> ProcessedImage for every distinct image of `messages`, loaded in the
        image pool; cancelling the caller (client gone) drops the loads not yet started and
        sets `stop`, which ends the downloads under way within a poll interval."""
        from mistralpy.processing.chat_template import image_sources
        from mistralpy.processing.errors import TooManyImagesError

        sources = list(dict.fromkeys(image_sources(messages)))  # the same image loads once
        limit = self.image_policy.max_images_per_request
        if _count_images(messages) > limit:
            raise TooManyImagesError(f"at most {limit} images per request", "messages")
        if self.image_processor_config is None:  # a text-only model: build_chat_prompt refuses
            return {}
        loop = asyncio.get_running_loop()
        loads = [loop.run_in_executor(self.image_pool, self._load_image, s, stop) for s in sources]
        try:
            return dict(zip(sources, await asyncio.gather(*loads)))
        except BaseException:  # a failure or a cancellation: the rest is moot
            stop.set()
            raise
        finally:
            for load in loads:  # after a failure or a cancellation: the rest is moot
                load.cancel()

    def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        images: dict[str, ProcessedImage],
        stop: threading.Event,
    ) -> ProcessedPrompt:
        from mistralpy.processing.chat_template import build_chat_prompt

        def loaded(source: str) -> ProcessedImage:
            return images[source] if source in images else self._load_image(source, stop)

        loader = loaded if self.image_processor_config is not None else None
        return build_chat_prompt(self.tokenizer, self.template, messages, tools, loader, stop=stop)

    def text(self, prompt: str | list[int], stop: threading.Event) -> ProcessedPrompt:
        from mistralpy.processing.chat_template import ProcessedPrompt

        if isinstance(prompt, list):
            return ProcessedPrompt(token_ids=list(prompt), images=[])
        return ProcessedPrompt(token_ids=self.tokenizer.encode(prompt, True, stop=stop), images=[])

    def _load_image(self, source: str, stop: threading.Event) -> ProcessedImage:
        from mistralpy.processing.images import load_image, preprocess_image

        assert self.image_processor_config is not None  # callers load images only with one
        image = load_image(source, self.image_policy, stop=stop)
        return preprocess_image(image, self.image_processor_config)


async def _in_thread(stop: threading.Event, fn: Callable[..., _T], *args: object) -> _T:
    """fn(*args, stop=stop) in a worker thread. A thread cannot be cancelled: when the caller
    is (client gone), `stop` is set and fn ends at its next check instead of running on."""
    try:
        return await asyncio.to_thread(fn, *args, stop=stop)
    except asyncio.CancelledError:
        stop.set()
        raise


def _message_chars(messages: list[dict]) -> int:
    """Characters of text in `messages` (string contents and text parts)."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            texts = (p.get("text") for p in content if isinstance(p, dict))
            total += sum(len(t) for t in texts if isinstance(t, str))
    return total


def _count_images(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in ("image_url", "image")
    )


# --- request → SamplingParams -----------------------------------------------------------


def _first_set(body: dict, *names: str) -> Any:
    for name in names:
        if body.get(name) is not None:
            return body[name]
    return None


def _logit_bias(raw: Any) -> dict[int, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidParameter("logit_bias", "logit_bias must map token ids to biases")
    try:
        return {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise InvalidParameter("logit_bias", "logit_bias keys must be token ids") from None


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    return (raw,) if isinstance(raw, str) else tuple(raw)


def grammar_from_request(body: dict) -> GrammarSpec | None:
    """The output constraint of a request; raises InvalidParameter if it names several.

    Accepted spellings: OpenAI `response_format` (json_object, json_schema), mistral.rs'
    `grammar: {"type": regex|lark|llguidance|json_schema|json_object|choice, "value": ...}`,
    vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (Lark), and a
    forced tool call (`tool_choice` "required" or a named function).
    """
    specs = [(param, spec) for param, spec in _grammar_sources(body) if spec is not None]
    if len(specs) > 1:
        names = ", ".join(param for param, _ in specs)
        raise InvalidParameter(specs[1][0], f"give only one output constraint; got {names}")
    if specs:
        _check_grammar_size(*specs[0])
    return specs[0][1] if specs else None


def _check_grammar_size(param: str, spec: GrammarSpec) -> None:
    try:
        size = len(json.dumps(spec.value, ensure_ascii=False))
    except (TypeError, ValueError):  # not JSON: the grammar compiler names what is wrong
        return
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidParameter(
            param,
            f"the output constraint is {size} characters as JSON; at most {MAX_GRAMMAR_BYTES}",
        )


def grammar_param(body: dict) -> str | None:
    """The request field the grammar came from (names the parameter of a GrammarError)."""
    return next((param for param, spec in _grammar_sources(body) if spec is not None), None)


def _grammar_sources(body: dict) -> list[tuple[str, GrammarSpec | None]]:
    return [
        ("response_format", _response_format_grammar(body.get("response_format"))),
        ("grammar", _grammar_extension(body.get("grammar"))),
        *[(field, _guided(field, body.get(field))) for field in GUIDED_KINDS],
        ("tool_choice", _tool_grammar(body)),
    ]


def _response_format_grammar(fmt: Any) -> GrammarSpec | None:
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return GrammarSpec("json_object")
    if fmt.get("type") != "json_schema":
        raise InvalidParameter("response_format", "response_format.type must be text|json_*")
    json_schema = fmt.get("json_schema") or {}
    if json_schema.get("schema") is None:
        raise InvalidParameter("response_format", "json_schema.schema is required")
    return GrammarSpec("json_schema", json_schema["schema"], strict=bool(json_schema.get("strict")))


def _grammar_extension(grammar: Any) -> GrammarSpec | None:
    if grammar is None:
        return None
    if not isinstance(grammar, dict) or grammar.get("type") not in GRAMMAR_TYPES:
        raise InvalidParameter("grammar", f"grammar.type must be one of {GRAMMAR_TYPES}")
    kind = "lark" if grammar["type"] == "llguidance" else grammar["type"]
    return GrammarSpec(kind, grammar.get("value"))


def _guided(field: str, value: Any) -> GrammarSpec | None:
    return None if value is None else GrammarSpec(GUIDED_KINDS[field], value)


def _tool_grammar(body: dict) -> GrammarSpec | None:
    """`tool_choice` "required" or a named function forces a tool call through the grammar."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise InvalidParameter("tool_choice", "tool_choice other than auto|none needs tools")
    single = body.get("parallel_tool_calls") is False
    if choice == "required":
        return GrammarSpec("tool_calls", {"tools": tools, "mode": "required", "single": single})
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name not in {t.get("function", {}).get("name") for t in tools}:
        raise InvalidParameter("tool_choice", "tool_choice must be auto|none|required|a tool")
    return GrammarSpec("tool_calls", {"tools": tools, "mode": "named", "name": name})


def sampling_params_from_request(body: dict, *, chat: bool, tools_active: bool) -> SamplingParams:
    """SamplingParams of an OpenAI chat/completions body; raises InvalidParameter."""
    top_logprobs = body.get("top_logprobs") if chat else body.get("logprobs")
    logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
    if chat and top_logprobs and not logprobs:
        raise InvalidParameter("top_logprobs", "top_logprobs needs logprobs=true")
    _check_openai_ranges(body)
    return SamplingParams(
        max_tokens=_first_set(body, "max_completion_tokens", "max_tokens"),
        temperature=_default(body.get("temperature"), 1.0),
        top_p=_default(body.get("top_p"), 1.0),
        top_k=_default(body.get("top_k"), 0),
        min_p=_default(body.get("min_p"), 0.0),
        presence_penalty=_default(body.get("presence_penalty"), 0.0),
        frequency_penalty=_default(body.get("frequency_penalty"), 0.0),
        repetition_penalty=_default(body.get("repetition_penalty"), 1.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        seed=body.get("seed"),
        stop=_stop(body.get("stop")),
        ignore_eos=bool(body.get("ignore_eos", False)),
        n=_default(body.get("n"), 1),
        logprobs=logprobs,
        top_logprobs=_default(top_logprobs, 0),
        # The tool-call markers are special tokens: keep them in the text so we can parse them.
        skip_special_tokens=not tools_active,
        grammar=grammar_from_request(body),
    )


def _check_openai_ranges(body: dict) -> None:
    """Limits OpenAI sets tighter than SamplingParams (which also serves direct engine users)."""
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidParameter("temperature", f"temperature must be in [0, {MAX_TEMPERATURE:g}]")


def _check_not_streaming(body: dict) -> None:
    """A whole (non-streamed) response has no use for stream_options: refuse it, as OpenAI
    and vLLM do, rather than silently ignore what the client thinks it asked for."""
    if body.get("stream_options") is not None:
        raise InvalidParameter("stream_options", "stream_options needs stream: true")


def _default(value: _T | None, default: _T) -> _T:
    return default if value is None else value


# --- engine outputs → OpenAI dicts --------------------------------------------------------


def final_usage(final: RequestOutput) -> dict:
    """The usage block of a request's last RequestOutput (all n choices' tokens counted)."""
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    return usage_dict(len(final.prompt_token_ids), completion_tokens, final.metrics)


def usage_dict(prompt_tokens: int, completion_tokens: int, metrics: RequestMetrics | _Span) -> dict:
    """OpenAI usage plus mistral.rs's timing fields, from the engine's RequestMetrics."""
    now = time.monotonic()
    arrival = metrics.arrival_time
    first_sched = metrics.first_scheduled_time or arrival
    first_tok = metrics.first_token_time or now
    finished = metrics.finished_time or now
    total = max(finished - arrival, 0.0)
    prompt_time = max(first_tok - first_sched, 0.0)
    compl_time = max(finished - first_tok, 0.0)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "avg_tok_per_sec": _rate(prompt_tokens + completion_tokens, total),
        "avg_prompt_tok_per_sec": _rate(prompt_tokens, prompt_time),
        "avg_compl_tok_per_sec": _rate(completion_tokens, compl_time),
        "total_time_sec": total,
        "total_prompt_time_sec": prompt_time,
        "total_completion_time_sec": compl_time,
    }
    # a batch's _Span sums no draft counters: only single requests report them
    speculative = None if isinstance(metrics, _Span) else speculative_usage(metrics)
    if speculative is not None:
        usage["speculative"] = speculative
    return usage


def speculative_usage(metrics: RequestMetrics) -> dict | None:
    """Speculative decoding's counters of a request (vLLM's spec-decode metric names), or
    None when it verified no draft. Mean acceptance length: tokens a verify step emitted."""
    drafts = metrics.num_drafts
    if not drafts:
        return None
    draft_tokens, accepted = metrics.num_draft_tokens, metrics.num_accepted_tokens
    return {
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "mean_acceptance_length": 1 + accepted / drafts,
    }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """Engine TokenLogprobs → OpenAI chat `logprobs` ({"content": [...]})."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _token_bytes(e.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token)}
                    for t in e.top_logprobs
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict:
    """Engine TokenLogprobs → legacy completions `logprobs` (parallel lists)."""
    offsets, pos = [], text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


@dataclass
class _ChoiceState:
    """Streaming bookkeeping of one choice."""

    parser: ToolCallStreamParser | None
    logprobs_sent: int = 0
    finished: bool = False


def _finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    if reason == "stop" and has_tool_calls:
        return "tool_calls"
    return reason


# --- the service ------------------------------------------------------------------------


class ChatService:
    """Chat and text completions on one AsyncEngine; returns OpenAI-shaped dicts."""

    def __init__(
        self,
        engine: ChatEngine,
        tokenizer: Tokenizer,
        prompts: PromptBuilder,
        served_model_name: str,
        max_model_len: int,
        tool_parser: Callable[[], ToolCallStreamParser] = ToolCallStreamParser,
        model_aliases: tuple[str, ...] = (),
        default_max_tokens: int | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.tool_parser = tool_parser
        # Other names accepted in `model` (e.g. the model id, "default", mistral.rs' "mistral3").
        self.model_names = {served_model_name, "default", *model_aliases}
        # Reply limit of requests that set none (interactive use: `run`, the builder), cut to
        # the room left in the context; None keeps OpenAI's "until the context is full".
        self.default_max_tokens = default_max_tokens

    # -- preparation --

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise ModelNotFound(model)

    async def _prepare_chat(self, body: dict) -> tuple[ProcessedPrompt, SamplingParams, bool]:
        self.check_model(body.get("model"))
        messages = _openai_messages(body.get("messages"))
        tools = _tools(body)
        tools_active = tools is not None and body.get("tool_choice") != "none"
        params = sampling_params_from_request(body, chat=True, tools_active=tools_active)
        if tools is not None and not tools_active:
            params = self._without_tool_calls(params)
        self._check_text_size(_message_chars(messages), "messages")
        prompt = await self._chat_prompt(messages, tools)
        self._check_length(prompt, params)
        return prompt, self._with_default_limit(prompt, params), tools_active

    async def _prepare_completion(self, body: dict) -> tuple[list[ProcessedPrompt], SamplingParams]:
        """The prompts of a completions body (one, or a batch) and their shared params."""
        self.check_model(body.get("model"))
        prompts_in = _completion_prompts(body.get("prompt"))
        params = sampling_params_from_request(body, chat=False, tools_active=False)
        prompts = []
        for prompt_in in prompts_in:
            self._check_prompt_input(prompt_in)
            prompt = await _in_thread(threading.Event(), self.prompts.text, prompt_in)
            self._check_length(prompt, params)
            prompts.append(prompt)
        if len(prompts) == 1:
            params = self._with_default_limit(prompts[0], params)
        return prompts, params

    def _check_prompt_input(self, prompt_in: str | list[int]) -> None:
        """Text that cannot fit is refused before tokenizing it; token ids must be ids of
        this vocabulary (an id past it would fail the whole model step)."""
        if isinstance(prompt_in, str):
            self._check_text_size(len(prompt_in), "prompt")
        elif max(prompt_in) >= self.tokenizer.vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size {self.tokenizer.vocab_size}",
                "prompt",
            )

    async def _chat_prompt(self, messages: list[dict], tools: list[dict] | None) -> ProcessedPrompt:
        """Images first (their own pool), then the template in a worker thread."""
        stop = threading.Event()
        images = await self.prompts.load_images(messages, stop)
        return await _in_thread(stop, self.prompts.chat, messages, tools, images)

    def _without_tool_calls(self, params: SamplingParams) -> SamplingParams:
        """tool_choice "none": the tools stay in the prompt (as OpenAI and vLLM do), but the
        model may not start a call: its `[TOOL_CALLS]` token is biased away."""
        token_to_id = getattr(self.tokenizer, "token_to_id", None)
        token = token_to_id(TOOL_CALLS) if token_to_id is not None else None
        if token is None:
            return params
        bias = {**params.logit_bias, token: NO_TOOL_CALL_BIAS}
        return dataclasses.replace(params, logit_bias=bias)

    def _with_default_limit(
        self, prompt: ProcessedPrompt, params: SamplingParams
    ) -> SamplingParams:
        if params.max_tokens is not None or self.default_max_tokens is None:
            return params
        room = self.max_model_len - len(prompt.token_ids)  # >= 1 once _check_length passed
        return dataclasses.replace(params, max_tokens=min(self.default_max_tokens, room))

    def _check_text_size(self, num_chars: int, param: str) -> None:
        """Refuse, before tokenizing it, text that cannot fit: N characters are at least
        N / max_token_bytes tokens (tokenizing 10 MB takes seconds of a core)."""
        per_token = getattr(self.tokenizer, "max_token_bytes", None)
        if per_token is not None and num_chars // per_token >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt's {num_chars} characters are more than that.",
                param,
                "context_length_exceeded",
            )

    def _check_length(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        n = len(prompt.token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", "messages")
        if n >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {n} tokens and leaves no room to generate.",
                "messages",
                "context_length_exceeded",
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            # OpenAI's wording: it names no field, so it reads right under the Responses API
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                "max_tokens",
                "context_length_exceeded",
            )

    # -- chat --

    async def create_chat_completion(self, body: dict, request_id: str | None = None) -> dict:
        """A whole chat.completion response for an OpenAI chat request body."""
        request_id = request_id or new_request_id("chatcmpl")
        _check_not_streaming(body)
        prompt, params, tools_active = await self._prepare_chat(body)
        with _grammar_errors_name(grammar_param(body)):
            final = await self._run_to_end(request_id, prompt, params)
        choices = [self._chat_choice(o, tools_active, params.logprobs) for o in final.outputs]
        return self._response_body(request_id, "chat.completion", choices, final)

    def _response_body(
        self, request_id: str, kind: str, choices: list[dict], final: RequestOutput
    ) -> dict:
        """The whole (non-streamed) OpenAI response around `choices` of a finished request."""
        return {
            "id": request_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.served_model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": final_usage(final),
        }

    def _chat_choice(self, out: CompletionOutput, tools_active: bool, logprobs: bool) -> dict:
        message: dict = {"role": "assistant", "content": out.text}
        tool_calls = []
        if tools_active:
            parsed = parse_tool_calls(out.text)
            tool_calls = [c.to_openai() for c in parsed.tool_calls]
            # parsed.content: an unfinished call (cut by max_tokens) leaves no `[TOOL_CALLS]`
            # text behind; with no calls at all the content is "" rather than null
            message["content"] = parsed.content if tool_calls else parsed.content or ""
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "index": out.index,
            "message": message,
            "logprobs": chat_logprobs(out.logprobs or []) if logprobs else None,
            "finish_reason": _finish_reason(out.finish_reason, bool(tool_calls)),
        }

    async def stream_chat_completion(
        self, body: dict, request_id: str | None = None
    ) -> AsyncGenerator[dict, None]:
        """chat.completion.chunk dicts: role first, deltas, finish reasons, optional usage.

        The first chunk is yielded only once the engine accepted the request and produced
        its first output, so request errors surface before anything is sent.
        """
        request_id = request_id or new_request_id("chatcmpl")
        prompt, params, tools_active = await self._prepare_chat(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        generate = self.engine.generate(request_id, prompt, params)
        # closed early (client gone, error): the engine aborts the request
        async with contextlib.aclosing(generate) as outputs:
            with _grammar_errors_name(grammar_param(body)):
                first = await _first_output(outputs, request_id)
            chunk = _ChunkFactory(request_id, self.served_model_name, include_usage)
            yield chunk.make(
                [_choice_delta(i, {"role": "assistant", "content": ""}) for i in range(params.n)]
            )
            states = [
                _ChoiceState(self.tool_parser() if tools_active else None) for _ in range(params.n)
            ]
            last = first
            async for out in _chain(first, outputs):
                last = out
                deltas = [self._chat_delta(o, states[o.index], params) for o in out.outputs]
                choices = [c for c in deltas if c is not None]
                if choices:
                    yield chunk.make(choices)
            if include_usage:
                yield chunk.make([], usage=final_usage(last))

    def _chat_delta(
        self, out: CompletionOutput, state: _ChoiceState, params: SamplingParams
    ) -> dict | None:
        if state.finished:
            return None
        delta: dict = {}
        if state.parser is None:
            if out.delta_text:
                delta["content"] = out.delta_text
        else:
            parsed = state.parser.feed(out.delta_text)
            if out.finish_reason is not None:
                tail = state.parser.finish()
                parsed.content += tail.content
                parsed.tool_calls += tail.tool_calls
            if parsed.content:
                delta["content"] = parsed.content
            if parsed.tool_calls:
                delta["tool_calls"] = parsed.tool_calls
        choice = _choice_delta(out.index, delta)
        if params.logprobs and out.logprobs:
            choice["logprobs"] = chat_logprobs(out.logprobs[state.logprobs_sent :])
            state.logprobs_sent = len(out.logprobs)
        if out.finish_reason is not None:
            state.finished = True
            has_calls = state.parser is not None and state.parser.has_tool_calls
            choice["finish_reason"] = _finish_reason(out.finish_reason, has_calls)
        if not delta and choice["finish_reason"] is None and choice["logprobs"] is None:
            return None
        return choice

    # -- completions --

    async def create_completion(self, body: dict, request_id: str | None = None) -> dict:
        """A whole text_completion response for an OpenAI completions body; a batch of
        prompts gives choices prompt-major: choice k*n + j is prompt k's j-th sample."""
        request_id = request_id or new_request_id("cmpl")
        _check_not_streaming(body)
        prompts, params = await self._prepare_completion(body)
        ids = _batch_ids(request_id, len(prompts))
        with _grammar_errors_name(grammar_param(body)):
            finals = await _gather_all(
                [self._run_to_end(i, p, params) for i, p in zip(ids, prompts)]
            )
        choices = []
        for k, (prompt, final) in enumerate(zip(prompts, finals)):
            echo = self.tokenizer.decode(prompt.token_ids) if body.get("echo") else ""
            choices += [
                {
                    "index": k * params.n + o.index,
                    "text": echo + o.text,
                    "logprobs": completion_logprobs(o.logprobs or [], len(echo))
                    if params.logprobs
                    else None,
                    "finish_reason": o.finish_reason,
                }
                for o in final.outputs
            ]
        response = self._response_body(request_id, "text_completion", choices, finals[0])
        response["usage"] = batch_usage(finals)
        return response

    async def stream_completion(
        self, body: dict, request_id: str | None = None
    ) -> AsyncGenerator[dict, None]:
        """text_completion chunks, then an optional usage chunk; a batch's prompts stream
        side by side, their choices numbered as in `create_completion`."""
        request_id = request_id or new_request_id("cmpl")
        prompts, params = await self._prepare_completion(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk = _ChunkFactory(request_id, self.served_model_name, include_usage, "text_completion")
        ids = _batch_ids(request_id, len(prompts))
        streams = [
            self._completion_deltas(i, p, params, k * params.n)
            for k, (i, p) in enumerate(zip(ids, prompts))
        ]
        lasts: dict[str, RequestOutput] = {}
        with _grammar_errors_name(grammar_param(body)):
            async with contextlib.aclosing(_merge(streams)) as merged:
                async for out, choices in merged:
                    lasts[out.request_id] = out
                    if choices:
                        yield chunk.make(choices)
        if include_usage:
            yield chunk.make([], usage=batch_usage([lasts[i] for i in ids if i in lasts]))

    async def _completion_deltas(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams, first_index: int
    ) -> AsyncGenerator[tuple[RequestOutput, list[dict]], None]:
        """(engine output, its new choice deltas) of one completions prompt, as they come."""
        generate = self.engine.generate(request_id, prompt, params)
        sent = [0] * params.n
        # closed early (client gone, error): the engine aborts the request
        async with contextlib.aclosing(generate) as outputs:
            async for out in _chain(await _first_output(outputs, request_id), outputs):
                choices = []
                for o in out.outputs:
                    if not o.delta_text and o.finish_reason is None:
                        continue
                    lp = None
                    if params.logprobs and o.logprobs:
                        lp = completion_logprobs(o.logprobs[sent[o.index] :], 0)
                        sent[o.index] = len(o.logprobs)
                    choices.append(
                        {
                            "index": first_index + o.index,
                            "text": o.delta_text,
                            "logprobs": lp,
                            "finish_reason": o.finish_reason,
                        }
                    )
                yield out, choices

    # -- engine plumbing --

    async def _run_to_end(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams
    ) -> RequestOutput:
        """Drive one request to completion; the last RequestOutput with every choice merged."""
        final: RequestOutput | None = None
        by_index: dict[int, CompletionOutput] = {}
        generate = self.engine.generate(request_id, prompt, params)
        # closed early (client gone, error): the engine aborts the request
        async with contextlib.aclosing(generate) as outputs:
            async for out in outputs:
                _raise_if_failed(out, request_id)
                by_index.update({o.index: o for o in out.outputs})
                final = out
        if final is None:
            raise EngineRequestError(f"request {request_id} produced no output")
        final.outputs = [by_index[i] for i in sorted(by_index)]
        return final

    # -- tokenizer --

    async def tokenize(self, body: dict) -> dict:
        """{"tokens", "count", "max_model_len"} for `prompt` text or chat `messages`."""
        self.check_model(body.get("model"))
        if body.get("messages") is not None:
            messages = _openai_messages(body["messages"])
            self._check_text_size(_message_chars(messages), "messages")
            prompt = await self._chat_prompt(messages, _tools(body))
            tokens = list(prompt.token_ids)
        elif isinstance(body.get("prompt"), str):
            add_special = body.get("add_special_tokens", True)
            self._check_text_size(len(body["prompt"]), "prompt")
            encode = self.tokenizer.encode
            tokens = await _in_thread(threading.Event(), encode, body["prompt"], bool(add_special))
        else:
            raise InvalidRequest("give `prompt` (string) or `messages`", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    def detokenize(self, body: dict) -> dict:
        self.check_model(body.get("model"))
        tokens = body.get("tokens")
        if not _is_token_list(tokens):
            raise InvalidRequest("tokens must be a list of token ids", "tokens")
        if any(t >= self.tokenizer.vocab_size for t in tokens):
            raise InvalidRequest("token id out of vocabulary", "tokens")
        skip = bool(body.get("skip_special_tokens", True))
        return {"prompt": self.tokenizer.decode(tokens, skip)}


@dataclass
class _ChunkFactory:
    request_id: str
    model: str
    include_usage: bool
    obj: str = "chat.completion.chunk"

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def make(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {
            "id": self.request_id,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI does
        return chunk


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions `prompt`: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or _is_token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        prompts = prompt
    else:
        prompts = []
    if not prompts or not all(prompts):
        raise InvalidRequest(
            "prompt must be a non-empty string, a token id list, or a list of those", "prompt"
        )
    if len(prompts) > MAX_BATCH_PROMPTS:
        raise InvalidRequest(f"at most {MAX_BATCH_PROMPTS} prompts per request", "prompt")
    return prompts


def _batch_ids(request_id: str, count: int) -> list[str]:
    """Engine request ids of a batch: the response's own id when there is one prompt."""
    return [request_id] if count == 1 else [f"{request_id}-{k}" for k in range(count)]


def batch_usage(finals: list[RequestOutput]) -> dict:
    """One usage block over several requests' last outputs (a completions batch)."""
    if len(finals) == 1:
        return final_usage(finals[0])
    metrics = [f.metrics for f in finals]

    def earliest(name: str) -> float | None:
        values = [getattr(m, name) for m in metrics if getattr(m, name) is not None]
        return min(values) if values else None

    finished = [m.finished_time for m in metrics if m.finished_time is not None]
    span = _Span(
        min(m.arrival_time for m in metrics),
        earliest("first_scheduled_time"),
        earliest("first_token_time"),
        max(finished) if len(finished) == len(metrics) else None,
    )
    prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
    completion_tokens = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return usage_dict(prompt_tokens, completion_tokens, span)


@dataclass
class _Span:
    """The RequestMetrics fields usage_dict reads, over a batch: first start, last finish."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


async def _gather_all(coros: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Await all; if one fails, cancel the others (their engine requests abort) and raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merge(streams: list[AsyncGenerator[_T, None]]) -> AsyncGenerator[_T, None]:
    """Items of several async iterators as each comes; an error in one ends all of them."""
    if len(streams) == 1:  # the common case keeps its plain order and no extra tasks
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream: AsyncGenerator[_T, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:  # cancelled: abort at once
                async for item in items:
                    await queue.put(item)
            await queue.put(end)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is end:
                left -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _choice_delta(index: int, delta: dict) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


async def _first_output(outputs: AsyncIterator[RequestOutput], request_id: str) -> RequestOutput:
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        raise EngineRequestError(f"request {request_id} produced no output") from None
    _raise_if_failed(first, request_id)
    return first


async def _chain(
    first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncGenerator[RequestOutput, None]:
    yield first
    async for out in rest:
        _raise_if_failed(out, first.request_id)
        yield out


@contextlib.contextmanager
def _grammar_errors_name(param: str | None) -> Iterator[None]:
    """Give a GrammarError from the engine the request field its grammar came from."""
    try:
        yield
    except ValueError as exc:
        if param is not None and getattr(exc, "param", None) is None:
            from mistralpy.processing.grammar import GrammarError

            if isinstance(exc, GrammarError):
                exc.param = param
        raise


def _raise_if_failed(out: RequestOutput, request_id: str) -> None:
    if out.error:
        raise EngineRequestError(f"request {request_id} failed: {out.error}")


def _is_token_list(value: object) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _openai_messages(messages: Any) -> list[dict]:
    """Checked OpenAI messages in the form the prompt builder takes (see openai_chat_to_mistral).

    A bare string is refused (400), as OpenAI does: mistral.rs took it as one user turn, but a
    typo'd body (`"messages": ""`) then starts a generation nobody asked for.
    """
    from mistralpy.processing.chat_template import openai_chat_to_mistral

    _check_messages(messages)
    return openai_chat_to_mistral(messages)


def _tools(body: dict) -> list[dict] | None:
    """The request's tools; an empty list is refused as OpenAI does (it is always a mistake)."""
    tools = body.get("tools")
    if isinstance(tools, list) and not tools:
        raise InvalidRequest("tools: [] is too short; omit tools or give at least one", "tools")
    return tools or None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {ROLES}", f"messages[{i}].role"
            )
        content = m.get("content")
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise InvalidRequest(f"messages[{i}].content is required", f"messages[{i}].content")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
