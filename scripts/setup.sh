#!/usr/bin/env bash
# Creates .venv and installs mistralpy with its test tools. Safe to run again.
# torch goes in first and pinned: on a CPU-only machine `torch==2.13.0` resolves to the CPU
# wheel; on a machine with an NVIDIA driver pip takes the default (CUDA) build. A bare `torch`
# requirement would pull a multi-GB CUDA build onto CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${MISTRALPY_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[${EXTRAS}]"
