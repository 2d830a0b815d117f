"""Fresh-per-run seeds that are identical on every xdist worker (see tests/conftest.py)."""

from __future__ import annotations

import os
import random


def fresh_seeds(n: int, salt: str) -> list[int]:
    """n seeds for one test module, new each run, equal across workers of the same run."""
    base = os.environ.get("MISTRALPY_TEST_SEED") or str(random.SystemRandom().randrange(2**31))
    rng = random.Random(f"{base}:{salt}")
    return [rng.randrange(2**31) for _ in range(n)]
