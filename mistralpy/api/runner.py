"""mistral.rs's Python entry points: the synchronous `Runner` and the async `VisionModelBuilder`.

Both open a model with `open_model` (shared with the server CLI) and talk to it through the
same `ChatService` as the HTTP server. The Runner drives the AsyncEngine from an event loop
in its own thread, so its methods are plain blocking calls.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mistralpy.api.chat import ChatService, TemplatePrompts
from mistralpy.api.types import (
    DEFAULT_REPLY_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    IsqType,
    ModelDType,
    ModelSelector,
    Response,
    TextMessages,
    VisionArchitecture,
    dtype_name,
)
from mistralpy.engine.config import EngineConfig  # plain values: no torch
from mistralpy.engine.speculative import parse_speculative_config

if TYPE_CHECKING:  # the engine and processing load torch; `import mistralpy` must not
    from mistralpy.engine.engine import AsyncEngine, LLMEngine
    from mistralpy.processing.chat_template import ChatTemplate
    from mistralpy.processing.images import ImagePolicy, ImageProcessorConfig
    from mistralpy.processing.tokenizer import Tokenizer

log = logging.getLogger("mistralpy")
_T = TypeVar("_T")
# What `send_chat_request` takes: a request, mistral.rs' TextMessages, an OpenAI body, or
# its messages alone
ChatInput = ChatCompletionRequest | TextMessages | dict | list[dict]
# --isq values (IsqType's, deduplicated: F8E4M3 is an alias of fp8)
ISQ_NAMES = tuple(sorted({t.value for t in IsqType}))


@dataclass(frozen=True)
class ModelOptions:
    """How to open one model; shared by Runner, VisionModelBuilder and `mistralpy serve`:
    the engine's config (each default lives there) plus what the chat layer adds."""

    engine: EngineConfig  # model, dtype, device, isq, batch sizes, KV cache, speculation
    jinja_explicit: str | None = None  # overrides every other chat template
    chat_template: str | None = None  # fallback template file when the checkpoint has none
    tokenizer_json: str | None = None
    served_model_name: str | None = None  # default: the model as given


@dataclass
class OpenedModel:
    """A loaded model: the engine plus what the chat service needs around it."""

    engine: AsyncEngine
    llm: LLMEngine  # the engine `engine` drives (read-only here: gauges, sizes)
    tokenizer: Tokenizer
    template: ChatTemplate
    image_config: ImageProcessorConfig | None  # None: a text-only model
    path: Path
    max_model_len: int
    options: ModelOptions

    def service(
        self, image_policy: ImagePolicy, default_max_tokens: int | None = None
    ) -> ChatService:
        """The chat service; `default_max_tokens` limits replies of requests that set none."""
        name = self.options.served_model_name or self.options.engine.model
        prompts = TemplatePrompts(self.tokenizer, self.template, image_policy, self.image_config)
        aliases = (self.options.engine.model, "mistral3", self.path.name)
        return ChatService(
            self.engine,
            self.tokenizer,
            prompts,
            name,
            self.max_model_len,
            model_aliases=aliases,
            default_max_tokens=default_max_tokens,
        )

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics and the banner. Read from another thread without a lock: each
        value is one int read, at worst a step stale."""
        llm = self.llm
        blocks = llm.runner.num_blocks
        free = llm.block_manager.num_free_blocks
        return {
            "kv_capacity_tokens": blocks * llm.config.block_size,
            "kv_cache_usage": (blocks - free) / blocks if blocks else 0.0,
            "num_waiting": len(llm.scheduler.waiting),
            "num_running": len(llm.scheduler.running),  # sequences (n of them per request)
            "num_running_requests": len({s.parent_id for s in list(llm.scheduler.running)}),
            "max_num_seqs": llm.config.max_num_seqs,
        }

    def quantization(self) -> str | None:
        """--isq, else the format of a pre-quantized directory, else the block formats a GGUF
        model's weights are served in (e.g. "q4_1, q8_0"); None for full precision."""
        if self.options.engine.isq:
            return self.options.engine.isq
        from mistralpy.quant.isq import QuantizedLinear
        from mistralpy.quant.prequantized import read_quantization_config

        stored = read_quantization_config(self.path) if self.path.is_dir() else None
        if stored is not None:
            return f"{stored.format} (pre-quantized)"
        runner = getattr(self.llm, "runner", None)
        model = getattr(runner, "model", None)  # tensor-parallel runners hold none
        modules = model.modules() if model is not None else []
        fmts = sorted({m.fmt.name for m in modules if isinstance(m, QuantizedLinear)})
        return ", ".join(fmts) or None

    def resolved_dtype(self) -> str:
        """The dtype the weights were loaded in (the option may say "auto")."""
        return str(self.llm.runner.dtype).removeprefix("torch.")

    def kv_cache_dtype(self) -> str:
        """The KV cache's storage dtype (the model's, or float8_e4m3fn)."""
        return str(self.llm.runner.kv_spec.dtype).removeprefix("torch.")


def check_isq(isq: str | None) -> str | None:
    """Normalised ISQ name; an unknown one raises UnknownQuantFormatError (a UserError)."""
    if isq is None:
        return None
    name = isq.value if isinstance(isq, IsqType) else str(isq).lower()
    from mistralpy.quant.formats import get_format

    get_format(name)  # an unknown name fails here, before any weight is read
    return name


def load_processing(
    path: Path, options: ModelOptions, tokenizer: Tokenizer
) -> tuple[Tokenizer, ChatTemplate, ImageProcessorConfig | None]:
    """Tokenizer (the engine's unless overridden), chat template and image settings (None
    for a text-only model)."""
    from mistralpy.model.config import read_config
    from mistralpy.processing.images import ImageProcessorConfig
    from mistralpy.processing.tokenizer import Tokenizer

    if options.tokenizer_json:
        tokenizer = Tokenizer.from_tokenizer_json(options.tokenizer_json)
    template = load_template(path, options, tokenizer)
    # a text-only decoder takes no images: no image settings to read (requests with images
    # are refused as invalid chats)
    mmproj = options.engine.mmproj
    if not read_config(path, mmproj).has_vision:
        return tokenizer, template, None
    if mmproj:
        return tokenizer, template, ImageProcessorConfig.from_gguf_mmproj(mmproj)
    return tokenizer, template, ImageProcessorConfig.from_model_dir(path)


def load_template(path: Path, options: ModelOptions, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template: --jinja-explicit, else the checkpoint's (with the bundled tool
    template for tool chats when it ignores `tools`), else --chat-template or the bundled one."""
    from mistralpy.processing.chat_template import ChatTemplate, needs_tool_template

    template = ChatTemplate.from_dir(path, options.jinja_explicit or None)
    if options.chat_template and not options.jinja_explicit:
        has_own = any((path / n).is_file() for n in ("chat_template.jinja", "chat_template.json"))
        if not has_own:
            template = ChatTemplate.from_dir(path, options.chat_template)
    if not options.jinja_explicit and needs_tool_template(template, tokenizer):
        log.warning(
            "the chat template of %s ignores `tools`: chats with tools or tool calls are "
            "rendered with mistralpy's bundled Mistral tool template (--jinja-explicit overrides)",
            path,
        )
        template = template.with_tool_template()
    return template


def load_engine(config: EngineConfig) -> LLMEngine:
    """The synchronous LLMEngine (slow: reads and maybe quantizes weights), with its grammar
    tokenizer built now: built by the first grammar request instead, it would hold the GIL
    for seconds and pause every running stream."""
    from mistralpy.engine.engine import LLMEngine

    engine = LLMEngine.from_config(config)
    if importlib.util.find_spec("llguidance") is not None:
        engine.grammar_tokenizer()
    return engine


def wrap_async(llm_engine: LLMEngine) -> AsyncEngine:
    """An AsyncEngine (its own stepping thread) around `llm_engine`."""
    from mistralpy.engine.engine import AsyncEngine

    return AsyncEngine(llm_engine)


async def open_model(options: ModelOptions) -> OpenedModel:
    """Load a model in a worker thread (the event loop stays free), then start its engine."""
    llm = await asyncio.to_thread(load_engine, options.engine)
    path = llm.model_path
    assert path is not None  # LLMEngine.from_config sets it
    tokenizer, template, image_config = await asyncio.to_thread(
        load_processing, path, options, llm.tokenizer
    )
    return OpenedModel(
        wrap_async(llm), llm, tokenizer, template, image_config, path, llm.max_model_len, options
    )


def trusted_image_policy() -> ImagePolicy:
    """The Python API's image policy: local paths and private hosts are the caller's to use."""
    from mistralpy.processing.images import ImagePolicy

    return ImagePolicy.trusted_local()


# --- the synchronous Runner -------------------------------------------------------------


class _LoopThread:
    """An event loop running in a daemon thread; run coroutines on it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            # Ctrl-C while waiting: the coroutine is cancelled on the loop before anything
            # scheduled after this (an aclose of the same generator) runs
            future.cancel()
            raise

    def iterate(self, agen: AsyncGenerator[_T, None]) -> Iterator[_T]:
        """Pull an async iterator living on the loop from this thread; closing it closes it."""
        try:
            while True:
                try:
                    yield self.run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.run(agen.aclose())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class Runner:
    """mistral.rs's `Runner`: load a model, then send blocking requests to it."""

    model: OpenedModel | None  # None: a Runner around a given service (`from_service`)

    def __init__(
        self,
        which: ModelSelector,
        in_situ_quant: str | IsqType | None = None,
        max_seqs: int = EngineConfig.max_num_seqs,
        prefix_cache_n: int = 16,  # mistral.rs' cache size; here only 0 (off) or not
        jinja_explicit: str | None = None,
        chat_template: str | None = None,
        seed: int = EngineConfig.seed,
        device: str = EngineConfig.device,
        max_model_len: int | None = EngineConfig.max_model_len,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        memory_goal: float = EngineConfig.gpu_memory_utilization,
        load_format: str = EngineConfig.load_format,
        tensor_parallel_size: int = EngineConfig.tensor_parallel_size,
        kv_cache_dtype: str = EngineConfig.kv_cache_dtype,
        speculative_config: str | dict | None = None,
    ):
        engine = EngineConfig(
            model=which.model_id,
            mmproj=which.mmproj,
            dtype=which.dtype,
            device=device,
            isq=check_isq(in_situ_quant),
            load_format=load_format,
            max_model_len=max_model_len,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=memory_goal,
            enable_prefix_caching=prefix_cache_n > 0,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_dtype=kv_cache_dtype,
            speculative_config=parse_speculative_config(speculative_config),
        )
        options = ModelOptions(
            engine,
            jinja_explicit=jinja_explicit,
            chat_template=chat_template,
            tokenizer_json=which.tokenizer_json,
        )
        self._start(options)

    def _start(self, options: ModelOptions, default_max_tokens: int | None = None) -> None:
        self._loop = _LoopThread()
        try:
            self.model = self._loop.run(open_model(options))
        except BaseException:
            self._loop.stop()
            raise
        self.service = self.model.service(trusted_image_policy(), default_max_tokens)

    @classmethod
    def from_options(
        cls, options: ModelOptions, default_max_tokens: int | None = DEFAULT_REPLY_MAX_TOKENS
    ) -> Runner:
        """A Runner on explicit ModelOptions (what the CLI's `run` uses); replies of requests
        without max_tokens stop after `default_max_tokens` (None: at the context's end)."""
        runner = cls.__new__(cls)
        runner._start(options, default_max_tokens)
        return runner

    @classmethod
    def from_service(cls, service: ChatService) -> Runner:
        """A Runner around an existing service (tests; the service's engine is loop-agnostic)."""
        runner = cls.__new__(cls)
        runner._loop = _LoopThread()
        runner.model = None
        runner.service = service
        return runner

    def send_chat_completion_request(
        self, request: ChatCompletionRequest, model_id: str | None = None
    ) -> Response | Generator[Response, None, None]:
        """A ChatCompletionResponse, or an iterator of chunks when `request.stream`."""
        body = request.to_body()
        if request.stream:
            chunks = self.service.stream_chat_completion(body)
            return (Response(c, "ChatCompletionChunkResponse") for c in self._loop.iterate(chunks))
        res = self._loop.run(self.service.create_chat_completion(body))
        return Response(res, "ChatCompletionResponse")

    def send_completion_request(
        self, request: CompletionRequest, model_id: str | None = None
    ) -> Response | Generator[Response, None, None]:
        body = request.to_body()
        if request.stream:
            chunks = self.service.stream_completion(body)
            return (Response(c, "CompletionChunkResponse") for c in self._loop.iterate(chunks))
        return Response(self._loop.run(self.service.create_completion(body)), "CompletionResponse")

    def tokenize_text(
        self, text: str, add_special_tokens: bool = True, enable_thinking: bool | None = None
    ) -> list[int]:
        return self.service.tokenizer.encode(text, add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        body = {"tokens": tokens, "skip_special_tokens": skip_special_tokens}
        text: str = self.service.detokenize(body)["prompt"]
        return text

    def max_sequence_length(self) -> int:
        return self.service.max_model_len

    def shutdown(self) -> None:
        if self.model is not None:
            self.model.engine.shutdown()
        self._loop.stop()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# --- the async builder (mistral.rs's Rust API shape) -------------------------------------


class Model:
    """A built model: `await model.send_chat_request(messages)`, `model.stream_chat_request`."""

    def __init__(self, service: ChatService, opened: OpenedModel | None = None):
        self.service = service
        self.opened = opened

    async def send_chat_request(self, messages: ChatInput) -> Response:
        res = await self.service.create_chat_completion(_chat_body(messages))
        return Response(res, "ChatCompletionResponse")

    async def stream_chat_request(self, messages: ChatInput) -> AsyncGenerator[Response, None]:
        async for chunk in self.service.stream_chat_completion(_chat_body(messages)):
            yield Response(chunk, "ChatCompletionChunkResponse")

    def shutdown(self) -> None:
        """Stop the engine's stepping thread."""
        if self.opened is not None:
            self.opened.engine.shutdown()


def _chat_body(messages: ChatInput) -> dict:
    if isinstance(messages, ChatCompletionRequest):
        return messages.to_body()
    if isinstance(messages, TextMessages):
        body: dict = {"messages": list(messages.messages)}
        if messages.max_tokens is not None:
            body["max_tokens"] = messages.max_tokens
        return body
    if isinstance(messages, dict):
        return dict(messages)
    return {"messages": list(messages)}


class VisionModelBuilder:
    """`await VisionModelBuilder(id, VisionArchitecture.Mistral3).with_isq(IsqType.Q4K).build()`"""

    def __init__(self, model_id: str, arch: VisionArchitecture | str | None = None):
        self._options = ModelOptions(EngineConfig(model=model_id))
        self._max_tokens: int | None = DEFAULT_REPLY_MAX_TOKENS

    def with_max_tokens(self, max_tokens: int | None) -> VisionModelBuilder:
        """Reply limit of requests that set none (default DEFAULT_REPLY_MAX_TOKENS, cut to
        the room left in the context); None: until the context is full."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 (or None for no limit)")
        self._max_tokens = max_tokens
        return self

    def with_isq(self, isq: IsqType | str) -> VisionModelBuilder:
        return self._set_engine(isq=check_isq(isq))

    def with_logging(self) -> VisionModelBuilder:
        logging.basicConfig(level=logging.INFO)
        return self

    def with_dtype(self, dtype: ModelDType | str) -> VisionModelBuilder:
        return self._set_engine(dtype=dtype_name(dtype))

    def with_max_num_seqs(self, n: int) -> VisionModelBuilder:
        return self._set_engine(max_num_seqs=n)

    def with_max_model_len(self, n: int) -> VisionModelBuilder:
        return self._set_engine(max_model_len=n)

    def with_jinja_explicit(self, path: str) -> VisionModelBuilder:
        self._options = replace(self._options, jinja_explicit=path)
        return self

    def with_device(self, device: str) -> VisionModelBuilder:
        return self._set_engine(device=device)

    def with_mmproj(self, mmproj: str) -> VisionModelBuilder:
        """A GGUF model's vision encoder + projector file (llama.cpp's --mmproj)."""
        return self._set_engine(mmproj=mmproj)

    def with_kv_cache_dtype(self, kv_cache_dtype: str) -> VisionModelBuilder:
        """ "auto" (the model dtype) or "fp8" / "fp8_e4m3": twice the KV tokens of bf16."""
        return self._set_engine(kv_cache_dtype=kv_cache_dtype)

    def with_speculative_config(self, config: str | dict) -> VisionModelBuilder:
        """vLLM's speculative config, e.g. {"method": "ngram", "num_speculative_tokens": 4};
        raises InvalidParameter naming what is wrong."""
        return self._set_engine(speculative_config=parse_speculative_config(config))

    def _set_engine(self, **changes: Any) -> VisionModelBuilder:
        """Change EngineConfig fields (validated again on construction)."""
        engine = replace(self._options.engine, **changes)
        self._options = replace(self._options, engine=engine)
        return self

    async def build(self) -> Model:
        opened = await open_model(self._options)
        log.info("loaded %s (%s tokens of context)", opened.path, opened.max_model_len)
        return Model(opened.service(trusted_image_policy(), self._max_tokens), opened)


MultimodalModelBuilder = VisionModelBuilder
TextModelBuilder = VisionModelBuilder
