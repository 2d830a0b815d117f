"""The end-to-end GPU benchmark's CPU smoke mode: every row runs on a tiny config and the JSON
report holds them, with the engine agreeing with the reference path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    # vision, kv_logits, decode, batch (bs 1, 2 and 4: capped at the quick engine's 4
    # sequences), ttft, prefill, concurrent, long, and decode with isq q4k and fp8
    batch_rows = [f"decode step bs{b} bf16" for b in (1, 2, 4)]
    assert [n for n in names if n.startswith("decode step")] == batch_rows, names
    assert len(names) == 12, names
    assert all(r["value"] is not None for r in report["rows"]), report["rows"]
    assert report["engine_check"]["ok"], report["engine_check"]
    long_row = next(r for r in report["rows"] if r["name"] == "128k prompt")
    assert long_row["ok"]  # a prompt 4x the step's token budget: chunked prefill completes


def test_isq_only_run_skips_the_bf16_model(tmp_path):
    """`--rows isq` builds no bf16 engine: one row per ISQ format."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    argv = ["--quick", "--rows", "isq", "--isq-formats", "q4k,fp8", "--out", str(tmp_path)]
    assert gpu_e2e.main(argv) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["decode bs1 @1k isq=q4k", "decode bs1 @1k isq=fp8"], names
    assert all(r["value"] for r in report["rows"]), report["rows"]
    assert "engine_check" not in report and "load_s" not in report


def test_fp8_kv_rows_beside_the_model_dtype_ones(tmp_path):
    """`--kv-cache-dtypes auto,fp8`: decode and concurrent again on an fp8-cache engine (twice
    the blocks of a float32 cache... four times: the quick model is float32), and the logits
    row comparing the two caches on one prompt."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    argv = ["--quick", "--rows", "kv_logits,decode,concurrent", "--kv-cache-dtypes", "auto,fp8",
            "--out", str(tmp_path)]  # fmt: skip
    assert gpu_e2e.main(argv) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert len(rows) == 5, list(rows)
    assert all(r["value"] is not None for r in rows.values()), rows
    assert {n for n in rows if n.endswith(" kv=fp8")} == {
        "decode bs1 @1k ctx kv=fp8",
        "4 x (32 in / 8 out) kv=fp8",
    }
    fp8 = report["kv=fp8"]
    assert fp8["kv_blocks"] == 4 * report["kv_blocks"]  # e4m3 vs a float32 cache, same bytes
    (logits,) = [r for n, r in rows.items() if n.startswith("fp8 KV logits")]
    assert 0 < logits["value"] < 0.5 and 0 <= logits["extra"]["top1_agreement"] <= 1


@pytest.mark.timeout(300, method="thread")  # a rank stuck in gloo: only the thread method ends it
def test_tp_rows_compare_tp2_with_tp1_on_one_dummy_model(tmp_path):
    """`--rows tp`: tp=1 then tp=2 engines over the same dummy weights (each rank's slice of
    the tp=1 model), decode / concurrent / q4k rows and the check prompt. Oracle: tp=1 in the
    same run; on CPU (float32, gloo) only the all-reduce order differs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    assert gpu_e2e.main(["--quick", "--rows", "tp", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_e2e.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {
        "tp=1 decode bs1 @1k ctx", "tp=2 decode bs1 @1k ctx", "tp=1 4 x (32 in / 8 out)",
        "tp=2 4 x (32 in / 8 out)", "tp=2 vs tp=1 check prompt logits",
        "tp=2 decode bs1 @1k isq=q4k",
    }  # fmt: skip
    assert all(r["value"] for r in rows.values()), rows
    check = rows["tp=2 vs tp=1 check prompt logits"]
    assert check["value"] < 1e-5 and check["ok"], check  # the same model, not two random ones
    assert check["extra"]["tokens_tp2"] == check["extra"]["tokens_tp1"]
    assert "load_s" not in report  # no single-device model was built beside the engines
