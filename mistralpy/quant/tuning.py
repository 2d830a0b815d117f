"""Kernel launch configs chosen by timing at load, memoised per load and kept on disk.

Timing the q4k kernels' candidates takes minutes for the 24B model (five weight shapes, a
GEMV and six GEMM buckets each); the picks depend only on the card, the software and the
kernels' source, so a second load on the same machine reads them back instead. The file is
`kernel_tuning.json` in `mistralpy_cache_dir()` (`$MISTRALPY_CACHE`, else
`~/.cache/mistralpy`); `MISTRALPY_TUNING_CACHE=0` turns it off. Entries are grouped by a
context string (card name and compute capability, torch and Triton versions, a hash of the
tuned kernels' source): a new driver stack, card or kernel edit tunes afresh. A file that
cannot be read or parsed is treated as empty; a write that fails is logged and skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from mistralpy.paths import mistralpy_cache_dir

log = logging.getLogger(__name__)

_Config = TypeVar("_Config")
FILE_NAME = "kernel_tuning.json"
_FORMAT = 1  # bumped when the file's layout changes


def default_cache_path() -> Path | None:
    """Where picks are kept, from the environment (None: caching turned off)."""
    if os.environ.get("MISTRALPY_TUNING_CACHE", "1").lower() in ("0", "off", "false", "no"):
        return None
    return mistralpy_cache_dir() / FILE_NAME


def cuda_context() -> str:
    """The current CUDA card and software the picks hold for, with a hash of the source of
    the kernels they were timed on (`mistralpy.kernels.triton_quant` and `cuda_q4k`)."""
    import torch
    import triton

    from mistralpy.kernels import cuda_q4k, triton_quant

    source = b"".join(Path(str(m.__file__)).read_bytes() for m in (triton_quant, cuda_q4k))
    major, minor = torch.cuda.get_device_capability()
    return (
        f"{torch.cuda.get_device_name()} sm{major}{minor} torch {torch.__version__} "
        f"triton {triton.__version__} kernels {hashlib.sha256(source).hexdigest()[:16]}"
    )


def to_json(value: Any) -> Any:
    """A config (dataclass, dict of them, tuple, number, None) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    return value


class TuningStore:
    """Picks on disk at `path`, under the context `context` (computed on first use)."""

    def __init__(self, path: Path, context: Callable[[], str] = cuda_context) -> None:
        self.path = path
        self._context = context
        self._key: str | None = None

    def _context_key(self) -> str:
        if self._key is None:
            self._key = self._context()
        return self._key

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        ok = isinstance(data, dict) and data.get("format") == _FORMAT
        return data.get("contexts", {}) if ok and isinstance(data.get("contexts"), dict) else {}

    def get(self, key: tuple) -> dict | None:
        """`{"config": data}` stored under `key` in this context (data may be null: a pick
        of None), or None when there is none."""
        entries = self._read().get(self._context_key(), {})
        entry = entries.get(json.dumps(list(key))) if isinstance(entries, dict) else None
        return entry if isinstance(entry, dict) and "config" in entry else None

    def put(self, key: tuple, data: Any) -> None:
        """Store `data` under `key` (read-modify-write, replaced atomically: a reader never
        sees half a file; of two loads writing at once, one's new entries may be lost)."""
        contexts = self._read()
        entries = contexts.setdefault(self._context_key(), {})
        if not isinstance(entries, dict):
            entries = contexts[self._context_key()] = {}
        entries[json.dumps(list(key))] = {"config": data}
        text = json.dumps({"format": _FORMAT, "contexts": contexts}, indent=1, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("kernel tuning cache %s not written: %s", self.path, exc)


class KernelTuning:
    """Launch configs chosen by timing on the GPU, memoised per format and weight shape for one
    model load (the 24B decoder has 161 quantized linears but five distinct shapes, so each
    shape is timed once) and kept in `store` across loads (None: the store at
    `default_cache_path()`, if caching is on)."""

    def __init__(self, store: TuningStore | None = None) -> None:
        self._chosen: dict[tuple, object] = {}
        self._given = store

    @functools.cached_property
    def _store(self) -> TuningStore | None:
        """Looked up the first time a config is not memoised, so a CPU load, which tunes
        nothing, never reads the environment or touches the disk."""
        if self._given is not None:
            return self._given
        path = default_cache_path()
        return TuningStore(path) if path is not None else None

    def get(
        self, key: tuple, tune: Callable[[], _Config], decode: Callable[[Any], _Config]
    ) -> _Config:
        """The config under `key`: memoised, else read from the store (`decode` turns its
        JSON data back into a config; data it refuses is tuned again), else `tune()`d and
        stored. A key's first item names the kernel ("q4k", "q4k-gemm", ...); one kernel's
        tuner always returns one config type."""
        if key in self._chosen:
            return cast(_Config, self._chosen[key])
        store = self._store
        entry = store.get(key) if store is not None else None
        if entry is not None:
            try:
                config = decode(entry["config"])
            except (TypeError, ValueError, KeyError, AttributeError):
                entry = None  # written by other code: tune again
            else:
                log.info("kernel tuning %s: cached %s", key, entry["config"])
        if entry is None:
            config = tune()
            if store is not None:
                store.put(key, to_json(config))
        self._chosen[key] = config
        return config
