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
    engine_config,
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
    assert opts.engine.model == "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
    assert opts.engine.isq == "q4k"
    assert opts.jinja_explicit == "chat_templates/mistral_small_tool_call.jinja"
    assert cfg.port == 1234
    for sub in ("multimodal", "multimodal-plain"):
        args = build_legacy_parser().parse_args(
            ["--serve-ip", "127.0.0.1", "--max-seqs", "4", sub, "-m", "demo", "-d", "bf16"]
        )
        engine = engine_config(args)
        assert (engine.dtype, engine.max_num_seqs) == ("bfloat16", 4)
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
    engine = opts.engine
    assert (engine.max_model_len, engine.max_num_seqs, engine.max_num_batched_tokens) == (
        256,
        8,
        512,
    )
    assert (engine.load_format, engine.device, engine.dtype) == ("dummy", "cpu", "float32")
    assert (opts.served_model_name, engine.tensor_parallel_size) == ("small", 2)
    assert (cfg.port, cfg.api_key, cfg.allowed_local_media_path) == (9000, "k1", "/tmp")


def test_repl_history_reset_and_one_shot():
    service = make_fake_service()
    service.default_max_tokens = 5  # what `run --max-tokens 5` gives the runner
    runner = Runner.from_service(service)
    try:
        args = Namespace(input=None, image=[], temperature=0)
        out = io.StringIO()
        chat_repl(runner, args, io.StringIO("hello\nagain\n/reset\n/image bad:x\nhi\n/exit\n"), out)
        text = out.getvalue()
        assert text.count("\n> ") >= 4 and "error: no such file: bad:x" in text
        service.default_max_tokens = 3
        out = io.StringIO()
        chat_repl(runner, Namespace(input="hey", image=[], temperature=0), io.StringIO(), out)
        assert len(out.getvalue().strip()) == 3
    finally:
        runner.shutdown()


def repl(lines: str, runner=None) -> str:
    service = make_fake_service(delay=0.001)
    runner = runner or Runner.from_service(service)
    out = io.StringIO()
    try:
        chat_repl(runner, Namespace(input=None, image=[], temperature=0), io.StringIO(lines), out)
    finally:
        runner.shutdown()
    return out.getvalue()


def test_repl_commands_say_what_they_did(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"not checked until sent")
    text = repl(f"/image {image}\n/image /no/such.png\n/reset\n/help me\n/exit\n")
    assert f"image 1 attached to your next message: {image}" in text
    assert "error: no such file: /no/such.png" in text  # at once, not on the next message
    assert "history and pending images cleared" in text
    assert "unknown command /help" in text and "/image PATH_OR_URL" in text


class InterruptingOut(io.StringIO):
    """A terminal whose user presses Ctrl-C once the reply has printed `after` pieces."""

    def __init__(self, after: int):
        super().__init__()
        self.pieces, self.after = 0, after

    def write(self, text: str) -> int:
        if text and not text.startswith(("> ", "mistralpy", "\n")):
            self.pieces += 1
            if self.pieces == self.after:
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt():
    service = make_fake_service(delay=0.01)
    runner = Runner.from_service(service)
    out = InterruptingOut(after=3)
    try:
        args = Namespace(input=None, image=[], temperature=0)
        assert chat_repl(runner, args, io.StringIO("hello\nagain\n/exit\n"), out) == 0
    finally:
        runner.shutdown()
    text = out.getvalue()
    assert "[stopped]" in text and text.count("> ") == 3  # prompted again after the stop
    assert service.engine.aborted  # the interrupted request was aborted in the engine


def test_ctrl_c_at_the_prompt_exits():
    class CtrlC(io.StringIO):
        def readline(self, *_):
            raise KeyboardInterrupt

    out = io.StringIO()
    runner = Runner.from_service(make_fake_service())
    try:
        args = Namespace(input=None, image=[], temperature=0)
        assert chat_repl(runner, args, CtrlC(), out) == 0
    finally:
        runner.shutdown()


def test_bench_table_prints():
    from mistralpy.server.cli import print_table

    out = io.StringIO()
    print_table([{"prompt_len": 8, "ttft_s": 0.5}], out)
    assert "ttft_s" in out.getvalue() and json.dumps


def subcommand_parsers():
    parser = build_parser()
    return parser, parser.parse_args(["serve"]).subcommands


@pytest.mark.parametrize("command", ["serve", "run", "quantize"])
def test_help_describes_every_flag_and_lists_isq_values(command, capsys):
    import argparse

    from mistralpy.api.runner import ISQ_NAMES

    _, subs = subcommand_parsers()
    for action in subs[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ISQ_NAMES)
    if command != "quantize":
        assert "(default: " in text


def test_legacy_help_describes_every_flag_and_accepts_mistralrs_isq_spellings():
    parser = build_legacy_parser()
    subs = parser.parse_args(["plain", "-m", "x"]).subcommands
    for p in (parser, subs["vision-plain"]):
        for action in p._actions:
            assert action.help, action.option_strings
    for spelling in ("Q4K", "q4_k", "4", "Q8_0"):
        assert parser.parse_args(["--isq", spelling, "plain", "-m", "x"]).isq == spelling.lower()
    assert engine_config(parser.parse_args(["--isq", "Q4K", "plain", "-m", "x"])).isq == "q4k"


def test_version_and_a_misspelled_flag_shows_the_subcommand_usage(capsys):
    from mistralpy import __version__
    from mistralpy.server.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "demo", "--prot", "9000"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: mistralpy serve")
    assert "--prot" in err and "[-p PORT]" in err  # the usage lists the flags
    with pytest.raises(SystemExit):
        main(["serve", "--isq", "q9"])
    assert "q4k" in capsys.readouterr().err


def test_serve_listens_locally_unless_told():
    assert serve_config(build_parser().parse_args(["serve"])).host == "127.0.0.1"
    assert serve_config(build_legacy_parser().parse_args(["plain", "-m", "x"])).host == "127.0.0.1"


class BannerModel:
    """What `banner` reads of an OpenedModel."""

    def __init__(self, path, isq=None):
        from mistralpy.api.runner import ModelOptions, OpenedModel
        from mistralpy.engine.config import EngineConfig

        options = ModelOptions(EngineConfig("m", isq=isq))
        self.opened = OpenedModel(None, None, None, None, None, path, 512, options)
        self.path, self.max_model_len, self.options = path, 512, self.opened.options

    def stats(self):
        return {"kv_capacity_tokens": 4096}

    def resolved_dtype(self):
        return "float32"

    def kv_cache_dtype(self):
        return "float32"

    def quantization(self):
        return self.opened.quantization()


def test_banner_shows_the_real_address_and_never_the_key(tmp_path):
    from mistralpy.server.cli import ServeConfig, banner

    cfg = ServeConfig(host="0.0.0.0", port=4321, api_key="sekret-key")
    text = banner(BannerModel(tmp_path), cfg, "demo")
    assert "http://0.0.0.0:4321 (every interface)" in text
    assert "sekret-key" not in text and "$MISTRALPY_API_KEY" in text
    assert "http://127.0.0.1:4321/v1" in text  # the examples use a reachable address
    local = banner(BannerModel(tmp_path), ServeConfig(port=4321), "demo")
    assert "on http://127.0.0.1:4321\n" in local and "api_key='none'" in local


def test_banner_names_the_format_of_a_prequantized_directory(tmp_path):
    from mistralpy.server.cli import ServeConfig, banner

    quant = {"quant_method": "mistralpy-isq", "version": 1, "format": "q4k", "layers": {}}
    (tmp_path / "quantization.json").write_text(json.dumps(quant))
    assert "quantization:  q4k (pre-quantized)" in banner(BannerModel(tmp_path), ServeConfig(), "m")
    assert "quantization:  q8_0\n" in banner(BannerModel(tmp_path, "q8_0"), ServeConfig(), "m")


def no_model_load(monkeypatch):
    import mistralpy.server.cli as cli

    async def fail(options):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "load_with_progress", fail)


def test_busy_port_fails_before_the_model_loads(monkeypatch, capsys):
    import socket

    from mistralpy.server.cli import main

    no_model_load(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "demo", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, "{% if %}"])
def test_bad_jinja_explicit_fails_before_the_model_loads(content, tmp_path, monkeypatch, capsys):
    from mistralpy.server.cli import main

    no_model_load(monkeypatch)
    template = tmp_path / "t.jinja"
    if content is not None:
        template.write_text(content)
    for command in ("serve", "run"):
        assert main([command, "demo", "--jinja-explicit", str(template)]) == 2
        err = capsys.readouterr().err
        assert "--jinja-explicit" in err and str(template) in err


def test_quantize_resolves_demo_like_serve(tmp_path, monkeypatch):
    import mistralpy.checkpoint.loader as loader
    from mistralpy.engine.config import resolve_model_path
    from mistralpy.server.cli import main

    seen = []
    monkeypatch.setattr(loader, "quantize_checkpoint", lambda src, *rest: seen.append(src))
    assert main(["quantize", "demo", "--isq", "q4k", "-o", str(tmp_path / "q")]) == 0
    assert seen == [resolve_model_path("demo")]


@pytest.mark.slow
def test_quantize_demo(tmp_path, monkeypatch):
    """`quantize demo` works as `serve demo` does; while its first layer is quantized the bar
    says kernels are being compiled; the result reports itself as pre-quantized q8_0."""
    import mistralpy.checkpoint.loader as loader
    from mistralpy.api.runner import ModelOptions, OpenedModel
    from mistralpy.engine.config import EngineConfig
    from mistralpy.server.cli import main

    notes = []

    class Bar(loader.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            notes.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(loader, "tqdm", Bar)
    out = tmp_path / "q8"
    assert main(["quantize", "demo", "--isq", "q8_0", "-o", str(out)]) == 0
    assert notes[0] == loader.FIRST_QUANTIZED_NOTE and "quantized 1 layers" in notes
    opened = OpenedModel(
        None, None, None, None, None, out, 512, ModelOptions(EngineConfig(str(out)))
    )
    assert opened.quantization() == "q8_0 (pre-quantized)"


def test_readme_activates_the_venv_before_its_examples():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    activate = readme.index("source .venv/bin/activate")
    for example in ("mistralpy-server --port", "mistralpy serve MODEL", "from mistralpy import"):
        assert activate < readme.index(example), example


REPL_SCRIPT = """
import sys
from argparse import Namespace
from mistralpy.api.runner import Runner
from mistralpy.server.cli import chat_repl
from tests.server.fake_stack import make_fake_service

runner = Runner.from_service(make_fake_service(delay=0.05))
try:
    code = chat_repl(runner, Namespace(input=None, image=[], temperature=0))
finally:
    runner.shutdown()
print("exit", code, flush=True)
"""


def test_real_ctrl_c_in_a_terminal_chat():
    """SIGINT as a terminal sends it: the first stops the streaming reply (the loop thread's
    pending step is cancelled, no traceback) and the chat goes on; one at the prompt exits."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", REPL_SCRIPT],
        cwd=root,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=0,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")))
    reader.start()

    def wait_for(predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not predicate("".join(seen)):
            assert time.monotonic() < deadline, "".join(seen)
            time.sleep(0.02)

    try:
        wait_for(lambda t: t.endswith("> "))
        proc.stdin.write("hello\n")
        wait_for(lambda t: len(t.rsplit("> ", 1)[-1]) >= 3)  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        wait_for(lambda t: "[stopped]" in t and t.endswith("> "))
        proc.stdin.write("again\n")
        wait_for(lambda t: t.count("> ") == 3)  # a whole reply, then the next prompt
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    text = "".join(seen)
    assert "Traceback" not in text and "exit 0" in text
