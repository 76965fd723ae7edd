#!/usr/bin/env bash
# Create .venv and install sds with everything its tests need.
#   TORCH_SPEC  which torch to install first (default torch==2.13.0). On Linux x86-64, PyPI's
#               wheel of that version is the CUDA build; on a CPU-only machine you can save
#               several GB with the CPU build, e.g.
#               TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   PYTHON      interpreter to build the venv from (default python3; needs >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, so that the range in pyproject.toml is already satisfied and pip keeps it
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "ready: . .venv/bin/activate"
