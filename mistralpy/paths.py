"""Where mistralpy keeps files between runs (a leaf: no mistralpy imports)."""

from __future__ import annotations

import os
from pathlib import Path


def mistralpy_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """cache_dir, else $MISTRALPY_CACHE, else ~/.cache/mistralpy: named models' files,
    test checkpoints, the kernel tuning picks."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MISTRALPY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mistralpy"
