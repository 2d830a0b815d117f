"""The end-to-end GPU benchmark's CPU smoke mode: every row runs on a tiny config and the JSON
report holds them, with the engine agreeing with the reference path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_mode_runs_every_row(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    assert gpu_e2e.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    names = [r["name"] for r in report["rows"]]
    # vision, decode, batch (bs 1 and 4: capped at the quick engine's 4 sequences), ttft,
    # prefill, concurrent, long, and decode with isq q4k and fp8
    assert len(names) == 10, names
    assert all(r["value"] is not None for r in report["rows"]), report["rows"]
    assert report["engine_check"]["ok"], report["engine_check"]
    long_row = next(r for r in report["rows"] if r["name"] == "128k prompt")
    assert long_row["ok"]  # a prompt 4x the step's token budget: chunked prefill completes


def test_isq_only_run_skips_the_bf16_model(tmp_path):
    """`--rows isq` builds no bf16 engine; `q4k-float` (the float-GEMV baseline) is a row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    argv = ["--quick", "--rows", "isq", "--isq-formats", "q4k,q4k-float", "--out", str(tmp_path)]
    assert gpu_e2e.main(argv) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["decode bs1 @1k isq=q4k", "decode bs1 @1k isq=q4k-float"], names
    assert all(r["value"] for r in report["rows"]), report["rows"]
    assert "engine_check" not in report and "load_s" not in report
