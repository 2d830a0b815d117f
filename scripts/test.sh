#!/usr/bin/env bash
# Installs everything on a fresh machine, then lints and runs the test suite.
#   scripts/test.sh           default suite (what CI runs)
#   scripts/test.sh --slow    only the slow tests (long soak/benchmark-like checks)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/install_browser.sh  # chromium + playwright for the chat page's browser tests
PY=.venv/bin/python
"$PY" -m ruff check mistralpy tests benchmarks
"$PY" -m ruff format --check mistralpy tests benchmarks
"$PY" -m mypy  # [tool.mypy] in pyproject.toml
if [ "${1:-}" = "--slow" ]; then
  exec "$PY" -m pytest -m slow -n 2 -q
fi
exec "$PY" -m pytest -n 2 -q --durations=15
