#!/usr/bin/env bash
# Installs everything on a fresh machine and starts the OpenAI-compatible server.
#   scripts/serve.sh                 serves the demo checkpoint (built on first use)
#   scripts/serve.sh MODEL [ARGS..]  serves a local directory or a Hugging Face id
# It listens on 127.0.0.1; add `--host 0.0.0.0 --api-key KEY` to serve other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
MODEL="${1:-demo}"
shift || true
exec .venv/bin/mistralpy serve "$MODEL" "$@"
