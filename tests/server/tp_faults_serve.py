"""`mistralpy serve` with test faults in its spawned tensor-parallel workers (tests only).

Run as a script (`python tp_faults_serve.py serve ...`). A spawned worker re-runs this file as
`__mp_main__` before its target starts, so the worker alone sees the faults its environment
names; rank 0 runs the real command untouched:
- MISTRALPY_TEST_WORKER_PID_DIR=DIR: the worker creates DIR/<its pid> (so a test can kill it);
- MISTRALPY_TEST_WORKER_LOAD_FAILS=1: loading the worker's shard raises.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

INJECTED = "injected fault: this worker cannot load its shard"


def _fail_load(*args: object, **kwargs: object) -> None:
    raise RuntimeError(INJECTED)


if __name__ == "__mp_main__":
    pid_dir = os.environ.get("MISTRALPY_TEST_WORKER_PID_DIR")
    if pid_dir:
        (Path(pid_dir) / str(os.getpid())).touch()
    if os.environ.get("MISTRALPY_TEST_WORKER_LOAD_FAILS") == "1":
        from mistralpy.checkpoint import loader

        loader.load_model = _fail_load  # the worker imports it by name when it loads

if __name__ == "__main__":
    from mistralpy.server.cli import main

    sys.exit(main())
