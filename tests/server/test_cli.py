"""CLI parsing (seed form and modern form), the REPL loop, and the startup banner."""

import io
import json
from argparse import Namespace

import pytest

from mistralpy.api.runner import Runner
from mistralpy.server.cli import (
    build_legacy_parser,
    build_parser,
    chat_repl,
    model_options,
    serve_config,
)
from tests.server.fake_stack import make_fake_service


def test_seed_legacy_form_parses():
    argv = [
        "--port",
        "1234",
        "--isq",
        "q4k",
        "--jinja-explicit",
        "chat_templates/mistral_small_tool_call.jinja",
        "vision-plain",
        "-m",
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        "-a",
        "mistral3",
    ]
    args = build_legacy_parser().parse_args(argv)
    opts, cfg = model_options(args), serve_config(args)
    assert opts.model_id == "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
    assert opts.isq == "q4k"
    assert opts.jinja_explicit == "chat_templates/mistral_small_tool_call.jinja"
    assert cfg.port == 1234
    for sub in ("multimodal", "multimodal-plain"):
        args = build_legacy_parser().parse_args(
            ["--serve-ip", "127.0.0.1", "--max-seqs", "4", sub, "-m", "demo", "-d", "bf16"]
        )
        opts = model_options(args)
        assert (opts.dtype, opts.max_num_seqs) == ("bfloat16", 4)
        assert serve_config(args).host == "127.0.0.1"
    with pytest.raises(SystemExit):
        model_options(build_legacy_parser().parse_args(["vision-plain", "-m", "x", "-a", "llava"]))


def test_modern_serve_form(monkeypatch):
    monkeypatch.setenv("MISTRALPY_API_KEY", "k1")
    args = build_parser().parse_args(
        [
            "serve",
            "demo",
            "--port",
            "9000",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "512",
            "--load-format",
            "dummy",
            "--device",
            "cpu",
            "--served-model-name",
            "small",
            "--allowed-local-media-path",
            "/tmp",
            "--tensor-parallel-size",
            "2",
            "--dtype",
            "f32",
        ]
    )
    opts, cfg = model_options(args), serve_config(args)
    assert (opts.max_model_len, opts.max_num_seqs, opts.max_num_batched_tokens) == (256, 8, 512)
    assert (opts.load_format, opts.device, opts.dtype) == ("dummy", "cpu", "float32")
    assert (opts.served_model_name, opts.tensor_parallel_size) == ("small", 2)
    assert (cfg.port, cfg.api_key, cfg.allowed_local_media_path) == (9000, "k1", "/tmp")


def test_repl_history_reset_and_one_shot():
    runner = Runner.from_service(make_fake_service())
    try:
        args = Namespace(input=None, image=[], max_tokens=5, temperature=0)
        out = io.StringIO()
        chat_repl(runner, args, io.StringIO("hello\nagain\n/reset\n/image bad:x\nhi\n/exit\n"), out)
        text = out.getvalue()
        assert text.count("\n> ") >= 4 and "error:" in text  # the bad image is reported
        out = io.StringIO()
        chat_repl(
            runner,
            Namespace(input="hey", image=[], max_tokens=3, temperature=0),
            io.StringIO(),
            out,
        )
        assert len(out.getvalue().strip()) == 3
    finally:
        runner.shutdown()


def test_bench_table_prints():
    from mistralpy.server.cli import print_table

    out = io.StringIO()
    print_table([{"prompt_len": 8, "ttft_s": 0.5}], out)
    assert "ttft_s" in out.getvalue() and json.dumps
