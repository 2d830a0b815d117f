"""The CPU benchmark scripts run end to end in their quick modes (tiny preset, few tokens), so
they do not rot. Peers that are not installed are skipped by the scripts themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One checkpoint cache for the module: the scripts write each preset/dtype once."""
    return str(tmp_path_factory.mktemp("ckpt"))


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # a table was printed
    return json.loads(out.read_text())


def test_load_memory_quick(tmp_path: Path, ckpt: str) -> None:
    data = _run(
        "load_memory.py",
        ["--quick", "--impls", "mistralpy", "--ckpt-dir", ckpt],
        tmp_path,
    )
    (row,) = data["rows"]
    assert row["impl"] == "mistralpy" and "note" in row and "error" not in row["note"]
    # the weights are resident once loaded, and the sampled private peak covers them
    assert row["touched_peak_mib"] >= 0.9 * row["model_mib"]
    assert row["anon_peak_mib"] >= 0.9 * row["model_mib"]
    assert data["hardware"]["cpu"]


def test_cpu_engine_quick_all_installed_peers(tmp_path: Path, ckpt: str) -> None:
    """Every implementation that is installed produces every metric, on prompts of the same
    token count; mistralpy's greedy text equals transformers' (same weights, float32)."""
    data = _run(
        "cpu_engine.py",
        ["--quick", "--threads", "1", "--ckpt-dir", ckpt],
        tmp_path,
    )
    raw = data["raw"]
    want = data["workload"]["single_prompt_tokens"][1:]
    for impl, result in raw.items():
        if result.get("error", "").endswith("not installed"):
            continue
        assert "error" not in result, (impl, result["error"])
        assert [s["prompt_tokens"] for s in result["single"]] == want, impl
        assert all(s["decode_tps"] > 0 and s["prefill_tps"] > 0 for s in result["single"])
        assert result["concurrent"]["gen_tokens"] == 2 * data["workload"]["gen_len"]
        assert result["image"]["prompt_tokens"] == data["workload"]["image_prompt_tokens"]
    if "error" not in raw["transformers"]:
        ours = [s["text"] for s in raw["mistralpy"]["single"]]
        assert ours == [s["text"] for s in raw["transformers"]["single"]]


def test_cpu_engine_quick_isq_rows(tmp_path: Path, ckpt: str) -> None:
    """--isq runs: float rows for mistralpy, ISQ rows (or a 'not on this branch' note), and a
    quality table whose float-vs-itself agreement is exact."""
    data = _run(
        "cpu_engine.py",
        [
            "--quick",
            "--isq",
            "--threads",
            "1",
            "--impls",
            "mistralpy",
            "--isq-formats",
            "q8_0",
            "--quality-formats",
            "q8_0",
            "--ckpt-dir",
            ckpt,
        ],
        tmp_path,
    )
    assert data["raw"]["mistralpy float32"]["single"][0]["decode_tps"] > 0
    assert "mistralpy q8_0" in data["raw"]
    rows = data["quality"]["rows"]
    assert rows[0]["agreement"] == 1.0
    assert rows[1]["format"] == "q8_0"


def test_spec_decode_quick(tmp_path: Path) -> None:
    """The forcing harness on the tiny model: every speculative run emits the plain tokens."""
    data = _run("spec_decode.py", ["--quick"], tmp_path)
    modes = [r["mode"] for r in data["rows"]]
    assert modes[0] == "plain" and modes.count("oracle") == 4
    for r in data["rows"]:
        if r["mode"] == "oracle":
            assert r["equal_to_plain"] and r["tokens"] == 24
            assert (r["acceptance"] == 0) == (r["alpha"] == 0)
            assert r["verify_steps"] > 0 and r["graph_verify_steps"] == 0  # CPU: eager
