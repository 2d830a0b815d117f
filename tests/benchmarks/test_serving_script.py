"""benchmarks/serving.py's server handling: a child started with its hook dies with its parent
(a benchmark killed at its time limit leaves no server holding the GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.serving import die_with_parent_hook
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent_hook())
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"  # a zombie is dead, only not reaped yet


def test_child_dies_with_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT)], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
