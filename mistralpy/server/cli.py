"""Command line: `mistralpy serve|run|bench|quantize` and the legacy `mistralpy-server` form.

mistralpy serve MODEL [--port 1234] [--isq q4k] [--jinja-explicit FILE] ...
mistralpy-server --port 1234 --isq q4k vision-plain -m MODEL -a mistral3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralpy.api.runner import ModelOptions, OpenedModel, check_isq, open_model
from mistralpy.api.types import dtype_name
from mistralpy.engine.config import KV_CACHE_DTYPES

DEFAULT_PORT = 1234
LEGACY_SUBCOMMANDS = ("vision-plain", "multimodal", "multimodal-plain", "plain", "vision")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve` needs beyond the model: where to listen and what to allow."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    allow_private_image_urls: bool = False
    allowed_local_media_path: str | None = None
    max_images_per_request: int | None = None


# --- argument parsing -------------------------------------------------------------------


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--isq", "--in-situ-quant", dest="isq", default=None, help="e.g. q4k, q8_0")
    p.add_argument("-d", "--dtype", default="auto", help="auto|bf16|f16|f32")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--max-model-len", "--max-seq-len", dest="max_model_len", type=int)
    p.add_argument("--max-num-seqs", "--max-seqs", dest="max_num_seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("-j", "--jinja-explicit", default=None, help="chat template overriding all")
    p.add_argument("-c", "--chat-template", default=None, help="fallback chat template")
    p.add_argument("-t", "--tokenizer-json", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="auto = model dtype; fp8/fp8_e4m3: e4m3 KV cache with per-layer scales, 2x tokens",
    )
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--served-model-name", default=None)


def _add_server_flags(p: argparse.ArgumentParser, port_default: int = DEFAULT_PORT) -> None:
    p.add_argument("--host", "--serve-ip", dest="host", default="0.0.0.0")
    p.add_argument("-p", "--port", type=int, default=port_default)
    p.add_argument("--api-key", default=None, help="or MISTRALPY_API_KEY")
    p.add_argument("--allow-private-image-urls", action="store_true")
    p.add_argument("--allowed-local-media-path", default=None)
    p.add_argument("--max-images-per-request", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistralpy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default="demo", help="dir, hub id, or 'demo'")
    _add_model_flags(serve)
    serve.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode graphs")
    _add_server_flags(serve)
    run = sub.add_parser("run", help="interactive chat in the terminal")
    run.add_argument("model", nargs="?", default="demo")
    run.add_argument("-i", "--input", default=None, help="one-shot prompt, then exit")
    run.add_argument("--image", action="append", default=[], help="image for the -i prompt")
    run.add_argument("--max-tokens", type=int, default=None)
    run.add_argument("--temperature", type=float, default=None)
    _add_model_flags(run)
    bench = sub.add_parser(
        "bench", help="load benchmark: the engine in-process, or any server with --url"
    )
    bench.add_argument("model", nargs="?", default="demo")
    _add_bench_flags(bench)
    _add_model_flags(bench)
    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint")
    quant.add_argument("model")
    quant.add_argument("--isq", required=True)
    quant.add_argument("-o", "--output", required=True)
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
    parser = argparse.ArgumentParser(prog="mistralpy-server")
    _add_server_flags(parser)
    parser.add_argument("--isq", "--in-situ-quant", dest="isq", default=None)
    parser.add_argument("-j", "--jinja-explicit", default=None)
    parser.add_argument("-c", "--chat-template", default=None)
    parser.add_argument("--max-seqs", dest="max_num_seqs", type=int, default=32)
    parser.add_argument("--max-model-len", "--max-seq-len", dest="max_model_len", type=int)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--served-model-name", default=None)
    sub = parser.add_subparsers(dest="selector", required=True)
    for name in LEGACY_SUBCOMMANDS:
        sel = sub.add_parser(name)
        sel.add_argument("-m", "--model-id", dest="model", required=True)
        sel.add_argument("-a", "--arch", default=None)
        sel.add_argument("-d", "--dtype", default="auto")
        sel.add_argument("-t", "--tokenizer-json", default=None)
    return parser


def model_options(args: argparse.Namespace) -> ModelOptions:
    """ModelOptions from parsed flags (modern or legacy)."""
    arch = getattr(args, "arch", None)
    if arch is not None and arch.lower() not in ("mistral3", "mistral"):
        raise SystemExit(f"error: --arch {arch}: mistralpy serves mistral3 models only")
    return ModelOptions(
        model_id=args.model,
        dtype=dtype_name(args.dtype),
        device=args.device,
        isq=args.isq.lower() if args.isq else None,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
        enable_prefix_caching=not args.no_prefix_caching,
        jinja_explicit=args.jinja_explicit,
        chat_template=args.chat_template,
        tokenizer_json=getattr(args, "tokenizer_json", None),
        seed=args.seed,
        load_format=getattr(args, "load_format", "auto"),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
        served_model_name=args.served_model_name,
        enforce_eager=getattr(args, "enforce_eager", False),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
    )


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("MISTRALPY_API_KEY") or None,
        allow_private_image_urls=args.allow_private_image_urls,
        allowed_local_media_path=args.allowed_local_media_path,
        max_images_per_request=args.max_images_per_request,
    )


# --- serve ------------------------------------------------------------------------------


def server_image_policy(cfg: ServeConfig) -> Any:
    """Strict by default: no private hosts, local paths only under the allowed directory."""
    from mistralpy.processing.images import ImagePolicy

    extra = {}
    if cfg.max_images_per_request is not None:
        extra["max_images_per_request"] = cfg.max_images_per_request
    media = Path(cfg.allowed_local_media_path).resolve() if cfg.allowed_local_media_path else None
    return ImagePolicy(
        allow_private_networks=cfg.allow_private_image_urls,
        allowed_local_media_path=media,
        **extra,
    )


async def load_with_progress(options: ModelOptions) -> OpenedModel:
    """open_model, announced on stderr (the weight loader draws its own progress bar)."""
    print(f"Loading {options.model_id} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    opened = await open_model(options)
    print(f"Loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return opened


def banner(opened: OpenedModel, cfg: ServeConfig, name: str) -> str:
    """What the server prints once ready: where, what, and two examples that work as printed."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}"
    stats = opened.stats()
    kv = stats.get("kv_capacity_tokens")
    kv_dtype = opened.kv_cache_dtype()
    key = cfg.api_key or "none"
    auth = f' -H "Authorization: Bearer {key}"' if cfg.api_key else ""
    body = json.dumps(
        {"model": name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    return "\n".join(
        [
            f"mistralpy serving {name} at {url}",
            f"  model:         {opened.path}",
            f"  dtype:         {opened.resolved_dtype()}",
            f"  quantization:  {opened.options.isq or 'none'}",
            f"  context:       {opened.max_model_len} tokens",
            f"  KV cache:      {int(kv) if kv else 'unknown'} tokens ({kv_dtype})",
            "",
            "Try it:",
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
            f"    -d '{body}'",
            "",
            f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
            f"api_key='{key}'); print(c.chat.completions.create(model='{name}', "
            f"messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=32)"
            f'.choices[0].message.content)"',
        ]
    )


async def serve_async(options: ModelOptions, cfg: ServeConfig) -> None:
    """Load the model, then serve it until interrupted (engine and server share one loop)."""
    import uvicorn

    from mistralpy.server.app import ServerSettings, create_app

    policy = server_image_policy(cfg)
    opened = await load_with_progress(options)
    service = opened.service(policy)
    app = create_app(service, ServerSettings(api_key=cfg.api_key), opened.stats)
    print(banner(opened, cfg, service.served_model_name), flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning")
    try:
        await uvicorn.Server(config).serve()
    finally:
        opened.engine.shutdown()


def _serve(options: ModelOptions, cfg: ServeConfig) -> int:
    check_isq(options.isq)
    asyncio.run(serve_async(options, cfg))
    return 0


# --- run (interactive) --------------------------------------------------------------------


def chat_repl(runner: Any, args: argparse.Namespace, stdin=sys.stdin, out=sys.stdout) -> int:
    """Terminal chat: history, `/image SRC`, `/reset`, `/exit`; streams replies."""
    from mistralpy.api.types import ChatCompletionRequest

    history: list[dict] = []
    images: list[str] = []

    def ask(text: str) -> None:
        content: Any = text
        if images:
            content = [{"type": "image_url", "image_url": {"url": s}} for s in images]
            content.append({"type": "text", "text": text})
            images.clear()
        history.append({"role": "user", "content": content})
        req = ChatCompletionRequest(
            messages=list(history),
            stream=True,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )
        reply = ""
        try:
            for chunk in runner.send_chat_completion_request(req):
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    reply += piece
                    out.write(piece)
                    out.flush()
        except ValueError as e:
            history.pop()
            out.write(f"error: {e}\n")
            return
        out.write("\n")
        history.append({"role": "assistant", "content": reply})

    if args.input is not None:
        images.extend(args.image)
        ask(args.input)
        return 0
    out.write("mistralpy chat: /image PATH_OR_URL, /reset, /exit\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        line = line.strip()
        if line == "/reset":
            history.clear()
            images.clear()
        elif line.startswith("/image "):
            images.append(line[len("/image ") :].strip())
        elif line:
            ask(line)


def _run(options: ModelOptions, args: argparse.Namespace) -> int:
    from mistralpy.api.runner import Runner

    runner = Runner.from_options(options)
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
            args.seed or 0,
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
            seed=args.seed or 0,
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


def print_table(rows: list[dict], out=sys.stdout, columns: Sequence[str] | None = None) -> None:
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
    target = args.url or options.model_id
    Path(args.output).write_text(json.dumps({"model": target, "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


# --- quantize -------------------------------------------------------------------------------


def _quantize(args: argparse.Namespace) -> int:
    from mistralpy.checkpoint.hub import resolve_model_path
    from mistralpy.checkpoint.loader import quantize_checkpoint
    from mistralpy.runner.model_runner import resolve_device

    check_isq(args.isq)
    src = resolve_model_path(args.model)
    quantize_checkpoint(src, Path(args.output), args.isq.lower(), resolve_device("auto"))
    print(f"wrote {args.output}")
    return 0


# --- entry points -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return _quantize(args)
        options = model_options(args)
        if args.command == "serve":
            return _serve(options, serve_config(args))
        if args.command == "run":
            return _run(options, args)
        return _bench(options, args)
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def legacy_main(argv: Sequence[str] | None = None) -> int:
    """`mistralpy-server --port 1234 --isq q4k vision-plain -m ID -a mistral3`."""
    args = build_legacy_parser().parse_args(argv)
    try:
        return _serve(model_options(args), serve_config(args))
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
