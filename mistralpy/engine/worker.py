"""A tensor-parallel worker rank started by an outside launcher (torchrun, or one command per
node): it serves no HTTP, only its shard of every step that rank 0's engine runs."""

from __future__ import annotations

import os

from mistralpy.engine.config import EngineConfig, resolve_model_path
from mistralpy.runner.distributed import Rendezvous, run_external_worker
from mistralpy.runner.model_runner import resolve_device


def launched_rank() -> Rendezvous | None:
    """The launcher's group of this process (from RANK, WORLD_SIZE, MASTER_ADDR, ...), if any."""
    return Rendezvous.from_env(os.environ)


def run_worker(config: EngineConfig, rdzv: Rendezvous) -> None:
    """Serve rank `rdzv.rank` of `config`'s model until rank 0 stops (returns) or the group
    breaks (raises). Runner settings, dtype and quantization come from rank 0."""
    path = resolve_model_path(config.model, config.revision)
    run_external_worker(path, resolve_device(config.device), rdzv)
