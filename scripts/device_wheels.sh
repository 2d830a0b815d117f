#!/usr/bin/env bash
# Wheels the GPU machine lacks for running `mistralpy serve` (and the HTTP bench), into .whl/
# (git-ignored), for Python 3.12 on x86-64 Linux.
#
#   scripts/device_wheels.sh [VENV_PYTHON]      # default /work/main/.venv/bin/python
#   PY_VERSION=3.11 DEST=/tmp/w scripts/device_wheels.sh   # same set for another Python (checks)
#
# The device already has torch, triton, numpy, numba, transformers and what they pull in
# (huggingface-hub, safetensors, tokenizers, jinja2, tqdm, pyyaml, regex, ...); it has no
# FastAPI, uvicorn, pydantic, starlette, mistral-common, llguidance, prometheus-client, ...
# This script takes the closure of pyproject.toml's runtime dependencies, as installed in
# VENV_PYTHON's environment (same versions, `pip freeze`), leaves out what the device has
# (DEVICE_HAS below; nothing under them is followed), and downloads one binary wheel each
# (glibc 2.17/2.28 builds preferred; llguidance ships manylinux_2_31 only).
#
# On the device (run tool: carry [".whl"]), prefix the command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# e.g. the serving row of the end-to-end benchmark:
#   ... && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_e2e.py --rows serving --out $OUT --budget-s 560
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${1:-/work/main/.venv/bin/python}"
DEST="${DEST:-.whl}"
export PY_VERSION="${PY_VERSION:-3.12}"
rm -rf "$DEST" && mkdir -p "$DEST"

pins=$("$VENV_PY" - <<'EOF'
import os
import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEVICE_HAS = {
    "torch", "triton", "numpy", "numba", "llvmlite", "transformers", "huggingface-hub",
    "safetensors", "tokenizers", "tqdm", "pyyaml", "regex", "filelock", "fsspec", "hf-xet",
    "packaging", "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "setuptools",
}
# The device's interpreter, for environment markers (python_version < "3.13" and so on).
PY = os.environ["PY_VERSION"]
ENV = {"python_version": PY, "python_full_version": f"{PY}.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}

with open("pyproject.toml", "rb") as f:
    todo = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
pins, seen = {}, set()
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))  # `pkg[extra]` pulls more than `pkg`
    if key in seen or name in DEVICE_HAS or (req.marker and not req.marker.evaluate(ENV)):
        continue
    seen.add(key)
    dist = md.distribution(req.name)  # missing here: fail loudly, the pins would be incomplete
    pins[name] = dist.version
    for extra in ["", *req.extras]:
        for r in map(Requirement, dist.requires or []):
            if r.marker is None and extra == "" or r.marker and r.marker.evaluate({**ENV, "extra": extra}):
                todo.append(Requirement(str(r).split(";")[0]))
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
EOF
)
echo "$pins"
for pin in $pins; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d "$DEST" "$pin"
done
ls "$DEST" | wc -l | xargs echo "wheels:"
du -sh "$DEST"
