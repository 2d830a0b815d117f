#!/usr/bin/env bash
# Installs what the chat page's browser tests need (pytest -m browser): Debian's chromium
# and Playwright for Python, which drives it through executable_path. Never runs
# `playwright install` (no browser download). Safe to run again: it does nothing when both
# are there. Cost on a fresh Debian 12 machine: ~40 s for chromium (apt, ~113 MB download,
# ~414 MB on disk) and ~15 s for the playwright wheel (~55 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if ! command -v chromium >/dev/null && ! command -v apt-get >/dev/null; then
  # not Debian-like: the browser tests skip, saying chromium is missing
  echo "install_browser.sh: no apt-get; install chromium yourself for pytest -m browser" >&2
elif ! command -v chromium >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
fi
if ! "$PY" -c "import playwright" 2>/dev/null; then
  "$PY" -m pip install -q "playwright>=1.45,<2"
fi
