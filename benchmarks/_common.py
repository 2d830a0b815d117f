"""Shared helpers of the CPU benchmark scripts: hardware line, checkpoints, workers, tables.

Each measurement runs in a fresh subprocess (a "worker": the same script with `--worker`), so
peak RSS is per measurement, a crash or panic of one peer is recorded instead of ending the run,
and no peer's thread pool or allocator state leaks into the next one's timings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATE = time.strftime("%Y-%m-%d")


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo plus core count (the hardware column of every table)."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def memory_gib() -> float:
    """MemTotal of /proc/meminfo in GiB (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def hardware() -> dict[str, Any]:
    """What a reader needs to compare figures: CPU, memory, load, library versions."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "memory_gib": round(memory_gib(), 1),
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": DATE,
    }
    for pkg in ("transformers", "mistralrs"):
        info[pkg] = package_version(pkg)
    return info


def package_version(name: str) -> str | None:
    """Installed version of distribution `name`, None when absent."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile); 0 off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ensure_checkpoint(root: Path, preset: str, dtype: str) -> Path:
    """`root/<preset>-<dtype>`: a random mistral3 checkpoint, written once and reused."""
    from mistralpy.testing.tiny_checkpoint import write_checkpoint

    target = root / f"{preset}-{dtype}"
    if not (target / "model.safetensors").is_file():
        tmp = root / f".{preset}-{dtype}.tmp"
        write_checkpoint(tmp, preset=preset, dtype=dtype)
        tmp.rename(target)
    return target


@dataclass
class WorkerResult:
    """What one worker subprocess returned: its JSON, or why it gave none."""

    ok: bool
    data: dict[str, Any]
    error: str | None
    wall_s: float


def run_worker(script: Path, spec: dict[str, Any], workdir: Path, timeout: float) -> WorkerResult:
    """Run `python script --worker SPEC OUT` in a fresh process; its JSON result or its error."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.get('impl', 'w')}-{time.monotonic_ns()}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.update(spec.get("env", {}))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return WorkerResult(False, {}, f"timed out after {timeout:.0f}s", timeout)
    wall = time.perf_counter() - start
    if proc.returncode == 0 and out_path.is_file():
        return WorkerResult(True, json.loads(out_path.read_text()), None, wall)
    return WorkerResult(False, {}, summarize_error(proc.stderr, proc.returncode), wall)


def summarize_error(stderr: str, returncode: int) -> str:
    """The telling lines of a failed worker: a Rust panic message or the Python exception."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "panicked at" in ln or "called `" in ln]
    exc = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    picked = keep[:2] + exc[-1:] or lines[-2:]
    return f"exit {returncode}: " + " | ".join(picked)[:400]


def worker_main(run: Any) -> None:
    """Entry of a worker: `script --worker SPEC OUT`; writes run(spec) as JSON to OUT."""
    spec = json.loads(Path(sys.argv[2]).read_text())
    result = run(spec)
    Path(sys.argv[3]).write_text(json.dumps(result))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `columns` (missing values blank, floats to 3 significant digits)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1))
