"""Run a Triton test module under TRITON_INTERPRET=1 in a fresh process.

Triton reads TRITON_INTERPRET once, at its first import; when another test module imported it
first, the kernel tests of these modules rerun their whole file in a subprocess instead.
A rerun that passes no test fails: a subprocess that collected or ran nothing proves nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def rerun_in_interpreter(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file]
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    log = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, log
    passed = re.findall(r"(\d+) passed", res.stdout)  # the summary line comes last
    assert passed and int(passed[-1]) > 0, "the interpreter run passed no test:\n" + log
