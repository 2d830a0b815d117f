"""vLLM's and mistral.rs's flags on `mistralpy serve`: each maps onto ours, is accepted as what
mistralpy always does, or stops at parse time saying what to use instead. Then the exact
commands of their Mistral Small 3.1 guides (model `demo`, program `mistralpy serve` /
`mistralpy-server`, plus a free loopback port) start a real server that answers."""

import json
import shlex

import openai
import pytest

from mistralpy.server.cli import (
    build_legacy_parser,
    build_parser,
    engine_config,
    main,
    serve_config,
)
from tests.server.conftest import free_port, start_server, stop_server

# vLLM's page (docs.vllm.ai, Mistral-Small-3.1 / mistral-small example) and mistral.rs's
# docs/MISTRAL3.md, with `demo` for the model id
VLLM = (
    "serve demo --tokenizer-mode mistral --config-format mistral --load-format mistral "
    "--tool-call-parser mistral --enable-auto-tool-choice --limit-mm-per-prompt "
    "'{\"image\":10}' --tensor-parallel-size 1"
)
MISTRALRS = (
    "serve -p 1234 --isq 4 --jinja-explicit chat_templates/mistral_small_tool_call.jinja -m demo"
)
MISTRALRS_SERVER = "--port 1234 vision-plain -m demo -a mistral3"  # mistralrs-server (≤ 0.5)
LEGACY = "import sys; from mistralpy.server.cli import legacy_main; sys.exit(legacy_main())"


def test_vllm_command_maps_onto_our_options():
    args = build_parser().parse_args(shlex.split(VLLM))
    engine, cfg = engine_config(args), serve_config(args)
    assert (engine.model, engine.load_format, engine.tensor_parallel_size) == ("demo", "auto", 1)
    assert cfg.max_images_per_request == 10
    args = build_parser().parse_args(
        ["serve", "--load-format", "dummy", "--limit-mm-per-prompt", "image=3"]
    )
    assert (
        engine_config(args).load_format == "dummy"
        and serve_config(args).max_images_per_request == 3
    )


def test_mistralrs_commands_map_onto_our_options():
    args = build_parser().parse_args(shlex.split(MISTRALRS) + ["--pa-gpu-mem-usage", "0.5"])
    engine = engine_config(args)
    assert (engine.model, engine.isq, engine.gpu_memory_utilization) == ("demo", "4", 0.5)
    assert serve_config(args).port == 1234
    legacy = build_legacy_parser().parse_args(
        ["--pa-blk-size", "16", *shlex.split(MISTRALRS_SERVER)]
    )
    assert engine_config(legacy).model == "demo"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--pa-gpu-mem", "4096"], "--gpu-memory-utilization"),
        (["--pa-ctxt-len", "4096"], "--max-model-len"),
        (["--pa-blk-size", "32"], "fixed at 16"),
        (["--tool-call-parser", "hermes"], "[TOOL_CALLS]"),
        (["--tokenizer-mode", "slow"], "auto, mistral or hf"),
        (["--limit-mm-per-prompt", '{"video": 1}'], "images only"),
        (["--limit-mm-per-prompt", '{"image": -1}'], ">= 0"),
    ],
)
def test_unsupported_values_say_what_to_use(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "demo", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and err.startswith("usage: mistralpy serve")


def test_help_lists_the_dropin_flags_with_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--limit-mm-per-prompt", "--tool-call-parser", "--pa-gpu-mem", "--model-id"):
        assert flag in out
    assert "MultiModalConfig" in out and "(default: mistral)" in out
    # every flag sits in one of vLLM's groups (or mistral.rs's): only -h is left ungrouped
    ungrouped = out.split("\noptions:\n")[1].split("\n\n")[0].strip().splitlines()
    assert len(ungrouped) == 1 and ungrouped[0].startswith("-h, --help")
    for group in ("ModelConfig", "CacheConfig", "SchedulerConfig", "Frontend", "mistral.rs"):
        assert f"\n{group}" in out


def run_and_ask(program: list[str], command: str) -> None:
    """Run `command` on a free loopback port (its own `1234`, else an added --port), then ask
    it one chat and one tool question."""
    port = free_port()
    args = shlex.split(command.replace(" 1234 ", f" {port} "))
    if str(port) not in args:
        args += ["--port", str(port)]
    proc = start_server(program + args, port, timeout=300)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "Hello!"}]
        res = c.chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0)
        assert res.usage.completion_tokens == 4
        # a forced call whose schema admits only `{}`: short and parseable even from random weights
        empty = {"type": "object", "properties": {}, "additionalProperties": False}
        tool = {"type": "function", "function": {"name": "f", "parameters": empty}}
        res = c.chat.completions.create(
            model="demo",
            messages=msgs,
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "f"}},
            max_tokens=64,
        )
        call = res.choices[0].message.tool_calls[0].function
        assert call.name == "f" and json.loads(call.arguments) == {}
    finally:
        stop_server(proc)


def test_vllm_guide_command_starts_and_answers():
    run_and_ask(["-m", "mistralpy.server.cli"], VLLM)


def test_mistralrs_guide_command_starts_and_answers():
    """`--isq 4` on CPU compiles the numba q4 kernels at load (~40 s on 2 cores)."""
    run_and_ask(["-m", "mistralpy.server.cli"], MISTRALRS)


def test_mistralrs_server_command_starts_and_answers():
    run_and_ask(["-c", LEGACY], MISTRALRS_SERVER)
