"""vLLM's and mistral.rs's serve flags, so the commands of their Mistral Small 3.1 guides run
as they are with `mistralpy serve` / `mistralpy-server`.

Each flag either does what it does there (mapped onto ours), is accepted because mistralpy
always behaves that way (said in its help), or fails at parse time with what to use instead.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from mistralpy.engine.config import EngineConfig

# vLLM's --load-format values that name the files of a Mistral repo; the loader reads either
# layout (HF shards when present, else `consolidated*.safetensors`), so both mean "auto".
CLI_LOAD_FORMATS = ("auto", "dummy", "mistral", "safetensors")
KV_BLOCK_SIZE = EngineConfig.block_size  # not a flag here
# vLLM's choice between a Mistral repo's two file sets: mistralpy reads whichever is there
FILE_FORMAT_FLAGS = (
    ("--tokenizer-mode", "the tokenizer is tekken.json (Mistral) or tokenizer.json, as present"),
    ("--config-format", "the config is config.json or params.json, as present"),
)
# mistral.rs PagedAttention flags with no counterpart: (flag, metavar, what to use instead)
UNSUPPORTED_MISTRALRS = (
    ("--pa-gpu-mem", "MB", "--gpu-memory-utilization (a fraction of GPU memory)"),
    ("--pa-ctxt-len", "TOKENS", "--max-model-len"),
)


def load_format(value: str) -> str:
    """The loader's load_format ("auto" | "dummy") of a --load-format value."""
    return "dummy" if value == "dummy" else "auto"


def _image_limit(value: str) -> int | None:
    """--limit-mm-per-prompt: vLLM's JSON (`{"image": 10}`) or old `image=10` form."""
    if not value.strip():
        return None  # vLLM's guide once printed `''`: no limit given
    try:
        limits = json.loads(value)
    except json.JSONDecodeError:
        pairs = (item.partition("=") for item in value.split(","))
        limits = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(limits, dict):
        raise argparse.ArgumentTypeError('give a JSON object such as {"image": 10}')
    other = sorted(k for k, n in limits.items() if k != "image" and str(n) != "0")
    if other:
        raise argparse.ArgumentTypeError(f"{', '.join(other)}: mistralpy serves images only")
    try:
        count = int(limits.get("image", 0))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError("the image limit must be a whole number") from None
    if count < 0:
        raise argparse.ArgumentTypeError("the image limit must be >= 0")
    return count


def _only(*allowed: str, instead: str) -> Callable[[str], str]:
    """An argparse type accepting `allowed` values and refusing others with what to do."""

    def check(value: str) -> str:
        if value.lower() not in allowed:
            raise argparse.ArgumentTypeError(f"{value!r} is not supported; {instead}")
        return value.lower()

    return check


def _unsupported(instead: str) -> Callable[[str], str]:
    def refuse(_value: str) -> str:
        raise argparse.ArgumentTypeError(f"not supported by mistralpy; {instead}")

    return refuse


def _block_size(value: str) -> int:
    if value.strip() != str(KV_BLOCK_SIZE):
        raise argparse.ArgumentTypeError(
            f"the KV block size is fixed at {KV_BLOCK_SIZE} tokens; leave the flag out"
        )
    return KV_BLOCK_SIZE


def add_vllm_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's names for what `serve` does that it did not take already."""
    for flag, what in FILE_FORMAT_FLAGS:
        p.add_argument(
            flag,
            type=_only("auto", "mistral", "hf", instead="use auto, mistral or hf"),
            default="auto",
            help=f"accepted: {what}",
        )
    p.add_argument(
        "--limit-mm-per-prompt",
        dest="max_images_per_request",
        type=_image_limit,
        default=None,
        metavar="JSON",
        help='images per request, as {"image": N} (same as --max-images-per-request)',
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted: requests with tools always get their calls parsed (tool_choice auto)",
    )
    p.add_argument(
        "--tool-call-parser",
        type=_only("mistral", instead="mistralpy parses Mistral's [TOOL_CALLS] format only"),
        default="mistral",
        help="mistral (the only format of Mistral models)",
    )


def add_mistralrs_flags(p: argparse.ArgumentParser, model_flag: bool) -> None:
    """mistral.rs' names (`mistralrs serve -m MODEL`, its PagedAttention flags)."""
    group = p.add_argument_group("mistral.rs names")
    if model_flag:
        group.add_argument(
            "-m",
            "--model-id",
            dest="model_id",
            default=None,
            help="the model, as `mistralrs serve -m` takes it (overrides MODEL)",
        )
    group.add_argument(
        "--pa-gpu-mem-usage",
        dest="gpu_memory_utilization",
        type=float,
        default=argparse.SUPPRESS,  # --gpu-memory-utilization's, else EngineConfig's
        help="same as --gpu-memory-utilization (fraction of GPU memory)",
    )
    for flag, metavar, instead in UNSUPPORTED_MISTRALRS:
        group.add_argument(
            flag,
            type=_unsupported(f"use {instead}"),
            default=None,
            metavar=metavar,
            help=f"not supported: use {instead}",
        )
    group.add_argument(
        "--pa-blk-size",
        type=_block_size,
        default=None,
        help=f"KV cache block size: only {KV_BLOCK_SIZE} (always paged)",
    )


# `vllm serve --help` groups its flags by the config each one sets; ours, by dest
VLLM_GROUPS = {
    "ModelConfig": (
        "dtype",
        "max_model_len",
        "seed",
        "served_model_name",
        "tokenizer_mode",
        "config_format",
        "tokenizer_json",
        "isq",
        "enforce_eager",
        "allowed_local_media_path",
        "mmproj",
    ),
    "LoadConfig": ("load_format",),
    "ParallelConfig": ("tensor_parallel_size",),
    "CacheConfig": ("gpu_memory_utilization", "kv_cache_dtype", "no_prefix_caching"),
    "MultiModalConfig": ("max_images_per_request", "allow_private_image_urls"),
    "SchedulerConfig": ("max_num_seqs", "max_num_batched_tokens"),
    "SpeculativeConfig": ("speculative_config", "speculative_model", "num_speculative_tokens"),
    "DeviceConfig": ("device",),
    "Frontend": (
        "host",
        "port",
        "api_key",
        "chat_template",
        "jinja_explicit",
        "enable_auto_tool_choice",
        "tool_call_parser",
        "max_queue_len",
        "max_connections",
        "header_timeout_s",
        "body_timeout_s",
        "keep_alive_timeout_s",
        "shutdown_timeout_s",
    ),
}


def group_like_vllm(p: argparse.ArgumentParser) -> None:
    """Move `p`'s ungrouped flags into vLLM's help groups.

    Done after the flags are defined, so the shared definitions in cli.py (used by `run` and
    `bench` too) stay as they are; argparse has no public API to regroup, hence the private
    lists (stable since Python 3.2).
    """
    groups = {name: p.add_argument_group(name) for name in VLLM_GROUPS}
    group_of = {dest: groups[name] for name, dests in VLLM_GROUPS.items() for dest in dests}
    ungrouped = p._optionals._group_actions
    for action in list(ungrouped):
        group = group_of.get(action.dest)
        if group is not None:
            ungrouped.remove(action)
            group._group_actions.append(action)
