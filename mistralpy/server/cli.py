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
from mistralpy.api.types import dtype_name, gguf_model_id

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
    serve.add_argument(
        "model", nargs="?", default="demo", help="dir, FILE.gguf, hub id, 'smollm2' or 'demo'"
    )
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
    bench = sub.add_parser("bench", help="TTFT / prefill / decode benchmark")
    bench.add_argument("model", nargs="?", default="demo")
    bench.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    bench.add_argument("--gen-len", type=int, default=128)
    bench.add_argument("--iterations", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--concurrency", type=int, default=None, help="N parallel requests")
    bench.add_argument("-o", "--output", default="bench.json")
    _add_model_flags(bench)
    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint")
    quant.add_argument("model")
    quant.add_argument("--isq", required=True)
    quant.add_argument("-o", "--output", required=True)
    return parser


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
    gguf = sub.add_parser("gguf", help="a GGUF file: -m DIR (or hub repo) -f FILE.gguf")
    gguf.add_argument("-m", "--quantized-model-id", dest="model", required=True)
    gguf.add_argument("-f", "--quantized-filename", dest="gguf_file", required=True)
    gguf.add_argument("-d", "--dtype", default="auto")
    return parser


def model_options(args: argparse.Namespace) -> ModelOptions:
    """ModelOptions from parsed flags (modern or legacy)."""
    arch = getattr(args, "arch", None)
    if arch is not None and arch.lower() not in ("mistral3", "mistral", "llama"):
        raise SystemExit(f"error: --arch {arch}: mistralpy serves mistral3, mistral and llama")
    gguf_file = getattr(args, "gguf_file", None)
    return ModelOptions(
        model_id=gguf_model_id(args.model, gguf_file) if gguf_file else args.model,
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
            f"  quantization:  {opened.quantization()}",
            f"  context:       {opened.max_model_len} tokens",
            f"  KV cache:      {int(kv) if kv else 'unknown'} tokens",
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


async def _one_request(service: Any, prompt_len: int, gen_len: int) -> dict:
    """Time one greedy completion of `prompt_len` tokens → TTFT, prefill and decode rates."""
    body = {
        "prompt": [1000 + (i % 1000) for i in range(prompt_len)],
        "max_tokens": gen_len,
        "temperature": 0,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first, tokens = None, 0
    async for chunk in service.stream_completion(body):
        for choice in chunk["choices"]:
            if choice["text"]:
                first = first or time.perf_counter()
                tokens += 1
    end = time.perf_counter()
    first = first or end
    ttft = first - start
    return {
        "prompt_len": prompt_len,
        "ttft_s": ttft,
        "prefill_tok_per_s": prompt_len / ttft if ttft > 0 else 0.0,
        "decode_tok_per_s": (tokens - 1) / (end - first) if end > first else 0.0,
        "gen_tokens": tokens,
    }


async def bench_async(options: ModelOptions, args: argparse.Namespace) -> list[dict]:
    opened = await load_with_progress(options)
    service = opened.service(None)
    rows = []
    for prompt_len in args.prompt_len:
        for _ in range(args.warmup):
            await _one_request(service, prompt_len, min(args.gen_len, 8))
        if args.concurrency:
            start = time.perf_counter()
            runs = await asyncio.gather(
                *[_one_request(service, prompt_len, args.gen_len) for _ in range(args.concurrency)]
            )
            wall = time.perf_counter() - start
            total = sum(r["gen_tokens"] for r in runs)
            rows.append(
                {
                    "prompt_len": prompt_len,
                    "concurrency": args.concurrency,
                    "mean_ttft_s": sum(r["ttft_s"] for r in runs) / len(runs),
                    "output_tok_per_s": total / wall,
                    "wall_s": wall,
                }
            )
            continue
        runs = [
            await _one_request(service, prompt_len, args.gen_len) for _ in range(args.iterations)
        ]
        rows.append({k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})
    return rows


def print_table(rows: list[dict], out=sys.stdout) -> None:
    if not rows:
        return
    keys = list(rows[0])
    out.write(" | ".join(f"{k:>18}" for k in keys) + "\n")
    for row in rows:
        out.write(
            " | ".join(
                f"{row[k]:>18.4g}" if isinstance(row[k], float) else f"{row[k]:>18}" for k in keys
            )
            + "\n"
        )


def _bench(options: ModelOptions, args: argparse.Namespace) -> int:
    rows = asyncio.run(bench_async(options, args))
    print_table(rows)
    Path(args.output).write_text(json.dumps({"model": options.model_id, "rows": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


# --- quantize -------------------------------------------------------------------------------


def _quantize(args: argparse.Namespace) -> int:
    from mistralpy.checkpoint.loader import quantize_checkpoint
    from mistralpy.engine.config import resolve_model_path
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
