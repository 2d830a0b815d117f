#!/usr/bin/env bash
# Installs everything on a fresh machine and starts the OpenAI-compatible server.
#   scripts/serve.sh                 serves the demo checkpoint (built on first use)
#   scripts/serve.sh MODEL [ARGS..]  serves a local directory or a Hugging Face id
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
MODEL="${1:-demo}"
shift || true
exec .venv/bin/mistralpy serve "$MODEL" "$@"
