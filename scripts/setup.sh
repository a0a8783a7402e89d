#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv from requirements.txt.
# Usage: bash scripts/setup.sh      (Python 3.11; set PYTHON=/path/to/python3.11 to choose one)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
.venv/bin/python -c "import torch, monailabel, diffusers, transformers; print('environment ready: torch', torch.__version__, '| monailabel', monailabel.__version__)"
