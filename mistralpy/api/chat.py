"""The chat service shared by the Python `Runner` and the HTTP server.

Takes OpenAI-shaped request bodies (plain dicts, already type-checked by the caller) and
returns OpenAI-shaped response dicts: chat completions, completions, their streamed chunks,
tokenize / detokenize. Prompt building (templating, image fetch + preprocessing) runs in a
worker thread so the event loop keeps serving other streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mistralpy.params import GrammarSpec, InvalidParameter, SamplingParams
from mistralpy.processing.tool_calls import TOOL_CALLS, ToolCallStreamParser, parse_tool_calls

ROLES = ("system", "user", "assistant", "tool")
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


class InvalidRequest(ValueError):
    """The request as a whole is unusable; `param` names the field, `code` a machine code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(ValueError):
    """The request names a model this service does not serve (HTTP 404)."""

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.")
        self.param = "model"
        self.code = "model_not_found"


class EngineRequestError(RuntimeError):
    """The engine failed this request (not the user's fault)."""


class PromptBuilder(Protocol):
    """Turns request content into a ProcessedPrompt (token ids + preprocessed images)."""

    def chat(self, messages: list[dict], tools: list[dict] | None) -> Any: ...

    def text(self, prompt: str | list[int]) -> Any: ...


@dataclass
class TemplatePrompts:
    """The real PromptBuilder: chat template + tokenizer + image loading under a policy."""

    tokenizer: Any  # processing.tokenizer.Tokenizer
    template: Any  # processing.chat_template.ChatTemplate
    image_policy: Any  # processing.images.ImagePolicy
    image_processor_config: Any  # what processing.images.preprocess_image takes; None: no images

    def chat(self, messages: list[dict], tools: list[dict] | None) -> Any:
        from mistralpy.processing.chat_template import build_chat_prompt
        from mistralpy.processing.errors import TooManyImagesError

        limit = getattr(self.image_policy, "max_images_per_request", None)
        if limit is not None and _count_images(messages) > limit:
            raise TooManyImagesError(f"at most {limit} images per request", "messages")
        loader = self._load_image if self.image_processor_config is not None else None
        return build_chat_prompt(self.tokenizer, self.template, messages, tools, loader)

    def text(self, prompt: str | list[int]) -> Any:
        from mistralpy.processing.chat_template import ProcessedPrompt

        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt, True)
        return ProcessedPrompt(token_ids=list(ids), images=[])

    def _load_image(self, source: Any) -> Any:
        from mistralpy.processing.images import load_image, preprocess_image

        return preprocess_image(load_image(source, self.image_policy), self.image_processor_config)


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
    return specs[0][1] if specs else None


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


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- engine outputs → OpenAI dicts --------------------------------------------------------


def final_usage(final: Any) -> dict:
    """The usage block of a request's last RequestOutput (all n choices' tokens counted)."""
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    return usage_dict(len(final.prompt_token_ids), completion_tokens, final.metrics)


def usage_dict(prompt_tokens: int, completion_tokens: int, metrics: Any) -> dict:
    """OpenAI usage plus mistral.rs's timing fields, from the engine's RequestMetrics."""
    now = time.monotonic()
    arrival = metrics.arrival_time
    first_sched = metrics.first_scheduled_time or arrival
    first_tok = metrics.first_token_time or now
    finished = metrics.finished_time or now
    total = max(finished - arrival, 0.0)
    prompt_time = max(first_tok - first_sched, 0.0)
    compl_time = max(finished - first_tok, 0.0)
    return {
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


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[Any]) -> dict:
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


def completion_logprobs(entries: list[Any], text_offset: int) -> dict:
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
        engine: Any,
        tokenizer: Any,
        prompts: PromptBuilder,
        served_model_name: str,
        max_model_len: int,
        tool_parser: Callable[[], ToolCallStreamParser] = ToolCallStreamParser,
        model_aliases: tuple[str, ...] = (),
    ):
        self.engine = engine  # AsyncEngine: generate(request_id, prompt, params), abort(id)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.tool_parser = tool_parser
        # Other names accepted in `model` (e.g. the model id, "default", mistral.rs' "mistral3").
        self.model_names = {served_model_name, "default", *model_aliases}

    # -- preparation --

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise ModelNotFound(model)

    async def _prepare_chat(self, body: dict) -> tuple[Any, SamplingParams, bool]:
        self.check_model(body.get("model"))
        messages = body.get("messages")
        if isinstance(messages, str):  # mistral.rs accepts a bare string as one user turn
            messages = [{"role": "user", "content": messages}]
        _check_messages(messages)
        tools = body.get("tools") or None
        tools_active = tools is not None and body.get("tool_choice") != "none"
        params = sampling_params_from_request(body, chat=True, tools_active=tools_active)
        if tools is not None and not tools_active:
            params = self._without_tool_calls(params)
        prompt = await asyncio.to_thread(self.prompts.chat, messages, tools)
        self._check_length(prompt, params)
        return prompt, params, tools_active

    async def _prepare_completion(self, body: dict) -> tuple[Any, SamplingParams]:
        self.check_model(body.get("model"))
        prompt_in = body.get("prompt")
        if isinstance(prompt_in, list) and len(prompt_in) == 1 and isinstance(prompt_in[0], str):
            prompt_in = prompt_in[0]
        if not prompt_in or not (isinstance(prompt_in, str) or _is_token_list(prompt_in)):
            raise InvalidRequest("prompt must be a non-empty string or token id list", "prompt")
        params = sampling_params_from_request(body, chat=False, tools_active=False)
        prompt = await asyncio.to_thread(self.prompts.text, prompt_in)
        self._check_length(prompt, params)
        return prompt, params

    def _without_tool_calls(self, params: SamplingParams) -> SamplingParams:
        """tool_choice "none": the tools stay in the prompt (as OpenAI and vLLM do), but the
        model may not start a call: its `[TOOL_CALLS]` token is biased away."""
        token_to_id = getattr(self.tokenizer, "token_to_id", None)
        token = token_to_id(TOOL_CALLS) if token_to_id is not None else None
        if token is None:
            return params
        bias = {**params.logit_bias, token: NO_TOOL_CALL_BIAS}
        return dataclasses.replace(params, logit_bias=bias)

    def _check_length(self, prompt: Any, params: SamplingParams) -> None:
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
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; you "
                f"requested {n} prompt tokens + {params.max_tokens} max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )

    # -- chat --

    async def create_chat_completion(self, body: dict, request_id: str | None = None) -> dict:
        """A whole chat.completion response for an OpenAI chat request body."""
        request_id = request_id or new_request_id("chatcmpl")
        prompt, params, tools_active = await self._prepare_chat(body)
        with _grammar_errors_name(grammar_param(body)):
            final = await self._run_to_end(request_id, prompt, params)
        choices = [self._chat_choice(o, tools_active, params.logprobs) for o in final.outputs]
        return self._response_body(request_id, "chat.completion", choices, final)

    def _response_body(self, request_id: str, kind: str, choices: list[dict], final: Any) -> dict:
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

    def _chat_choice(self, out: Any, tools_active: bool, logprobs: bool) -> dict:
        message: dict = {"role": "assistant", "content": out.text}
        tool_calls = []
        if tools_active:
            parsed = parse_tool_calls(out.text)
            tool_calls = [c.to_openai() for c in parsed.tool_calls]
            message["content"] = parsed.content if tool_calls else out.text
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
    ) -> AsyncIterator[dict]:
        """chat.completion.chunk dicts: role first, deltas, finish reasons, optional usage.

        The first chunk is yielded only once the engine accepted the request and produced
        its first output, so request errors surface before anything is sent.
        """
        request_id = request_id or new_request_id("chatcmpl")
        prompt, params, tools_active = await self._prepare_chat(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        outputs = self.engine.generate(request_id, prompt, params)
        done = False
        try:
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
                choices = [self._chat_delta(o, states[o.index], params) for o in out.outputs]
                choices = [c for c in choices if c is not None]
                if choices:
                    yield chunk.make(choices)
            if include_usage:
                yield chunk.make([], usage=final_usage(last))
            done = True
        finally:
            await self._close(outputs, request_id, done)

    def _chat_delta(self, out: Any, state: _ChoiceState, params: SamplingParams) -> dict | None:
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
        """A whole text_completion response for an OpenAI completions body."""
        request_id = request_id or new_request_id("cmpl")
        prompt, params = await self._prepare_completion(body)
        with _grammar_errors_name(grammar_param(body)):
            final = await self._run_to_end(request_id, prompt, params)
        echo = self.tokenizer.decode(prompt.token_ids) if body.get("echo") else ""
        choices = [
            {
                "index": o.index,
                "text": echo + o.text,
                "logprobs": completion_logprobs(o.logprobs or [], len(echo))
                if params.logprobs
                else None,
                "finish_reason": o.finish_reason,
            }
            for o in final.outputs
        ]
        return self._response_body(request_id, "text_completion", choices, final)

    async def stream_completion(
        self, body: dict, request_id: str | None = None
    ) -> AsyncIterator[dict]:
        """text_completion chunks, then an optional usage chunk."""
        request_id = request_id or new_request_id("cmpl")
        prompt, params = await self._prepare_completion(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        outputs = self.engine.generate(request_id, prompt, params)
        done = False
        try:
            with _grammar_errors_name(grammar_param(body)):
                first = await _first_output(outputs, request_id)
            chunk = _ChunkFactory(
                request_id, self.served_model_name, include_usage, "text_completion"
            )
            sent = [0] * params.n
            last = first
            async for out in _chain(first, outputs):
                last = out
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
                            "index": o.index,
                            "text": o.delta_text,
                            "logprobs": lp,
                            "finish_reason": o.finish_reason,
                        }
                    )
                if choices:
                    yield chunk.make(choices)
            if include_usage:
                yield chunk.make([], usage=final_usage(last))
            done = True
        finally:
            await self._close(outputs, request_id, done)

    # -- engine plumbing --

    async def _close(self, outputs: Any, request_id: str, finished: bool) -> None:
        """Close the engine stream; abort the request if we stopped early (disconnect, error)."""
        if not finished:
            self.engine.abort(request_id)
        await outputs.aclose()

    async def _run_to_end(self, request_id: str, prompt: Any, params: SamplingParams) -> Any:
        """Drive one request to completion; the last RequestOutput with every choice merged."""
        final = None
        by_index: dict[int, Any] = {}
        outputs = self.engine.generate(request_id, prompt, params)
        try:
            async for out in outputs:
                _raise_if_failed(out, request_id)
                by_index.update({o.index: o for o in out.outputs})
                final = out
        finally:
            await self._close(outputs, request_id, final is not None and final.finished)
        if final is None:
            raise EngineRequestError(f"request {request_id} produced no output")
        final.outputs = [by_index[i] for i in sorted(by_index)]
        return final

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # -- tokenizer --

    async def tokenize(self, body: dict) -> dict:
        """{"tokens", "count", "max_model_len"} for `prompt` text or chat `messages`."""
        self.check_model(body.get("model"))
        if body.get("messages") is not None:
            _check_messages(body["messages"])
            prompt = await asyncio.to_thread(self.prompts.chat, body["messages"], body.get("tools"))
            tokens = list(prompt.token_ids)
        elif isinstance(body.get("prompt"), str):
            add_special = body.get("add_special_tokens", True)
            tokens = self.tokenizer.encode(body["prompt"], bool(add_special))
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


def _choice_delta(index: int, delta: dict) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


async def _first_output(outputs: AsyncIterator[Any], request_id: str) -> Any:
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        raise EngineRequestError(f"request {request_id} produced no output") from None
    _raise_if_failed(first, request_id)
    return first


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for out in rest:
        _raise_if_failed(out, first.request_id)
        yield out


@contextlib.contextmanager
def _grammar_errors_name(param: str | None):
    """Give a GrammarError from the engine the request field its grammar came from."""
    try:
        yield
    except ValueError as exc:
        if param is not None and getattr(exc, "param", None) is None:
            from mistralpy.processing.grammar import GrammarError

            if isinstance(exc, GrammarError):
                exc.param = param  # type: ignore[attr-defined]
        raise


def _raise_if_failed(out: Any, request_id: str) -> None:
    if out.error:
        raise EngineRequestError(f"request {request_id} failed: {out.error}")


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


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
