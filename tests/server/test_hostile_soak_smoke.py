"""benchmarks/hostile_soak.py runs end to end in a short soak (so it does not rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a server start plus 20 s of attack
def test_hostile_soak_short_run(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hostile_soak.py"), "--duration", "20"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figs = json.loads(out.read_text())
    assert figs["rounds"] >= 1 and figs["lost"] == 0 and figs["health_failures"] == 0
    assert "| survivors / lost" in proc.stdout
