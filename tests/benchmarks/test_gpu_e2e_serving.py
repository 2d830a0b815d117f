"""gpu_e2e's opt-in serving row: the server it starts has the engine row's model, and its CPU
smoke run (engine row, then `mistralpy serve` over HTTP) reports both and stops the server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mistralpy.model.config import Mistral3Config, mistral_small_3_1_config, read_config
from mistralpy.testing.tiny_checkpoint import REAL_SHAPES, model_config, write_config_files

ROOT = Path(__file__).resolve().parents[2]


def _gpu_e2e():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    return gpu_e2e


def test_real_shapes_are_the_24b_config():
    assert Mistral3Config.from_hf_dict(model_config(REAL_SHAPES, "bfloat16")) == (
        mistral_small_3_1_config()
    )


def test_config_only_directory_serves_dummy_weights(tmp_path):
    """What the serving row hands to `serve --load-format dummy`: config and tokenizer, no
    weights; the flags match the engine row's batch limits."""
    gpu_e2e = _gpu_e2e()
    model_dir = write_config_files(tmp_path / "m", REAL_SHAPES, "bfloat16")
    assert read_config(model_dir) == mistral_small_3_1_config()
    assert not list(model_dir.glob("*.safetensors"))
    sizes = gpu_e2e.Sizes()
    flags = gpu_e2e.serving_flags(model_dir, sizes, torch.device("cuda"))
    assert flags[:3] == [str(model_dir), "--load-format", "dummy"]
    as_dict = dict(zip(flags[1::2], flags[2::2]))
    assert as_dict["--max-num-seqs"] == str(sizes.concurrent)
    assert as_dict["--max-num-batched-tokens"] == str(sizes.max_num_batched_tokens)
    assert as_dict["--dtype"] == "bf16"


@pytest.mark.slow  # ~35 s on 2 cores: a server start and two tiny load runs
def test_quick_serving_row(tmp_path):
    gpu_e2e = _gpu_e2e()
    assert gpu_e2e.main(["--quick", "--rows", "serving", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    engine, http = report["rows"]
    assert engine["value"] and http["value"], report["rows"]
    assert http["limit"] == engine["value"]
    extra = http["extra"]
    assert (extra["completed"], extra["failed"]) == (gpu_e2e.QUICK.concurrent, 0)
    assert extra["total_output_tokens"] == gpu_e2e.QUICK.concurrent * gpu_e2e.QUICK.concurrent_out
    assert extra["ttft_ms_p99"] > 0 and extra["itl_ms_p99"] > 0
    assert "mistralpy serving" in (tmp_path / "serve.log").read_text()
