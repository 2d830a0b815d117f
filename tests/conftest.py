"""Test-wide set-up: one fresh random seed per run, shared by all xdist workers.

Tests draw fresh random configs and inputs every run (oracles, not remembered numbers), but
xdist needs every worker to collect the same test ids, so collection-time seeds come from
`fresh_seeds`, derived from one base seed chosen by the controller. Re-run a failure with
MISTRALPY_TEST_SEED=<printed value>.
"""

from __future__ import annotations

import os
import random

SEED_ENV = "MISTRALPY_TEST_SEED"


def pytest_configure(config) -> None:
    # The controller (or a plain run) picks the seed; xdist workers inherit the environment.
    if SEED_ENV not in os.environ:
        os.environ[SEED_ENV] = str(random.SystemRandom().randrange(2**31))


def pytest_report_header(config) -> str:
    return f"{SEED_ENV}={os.environ.get(SEED_ENV)}"
