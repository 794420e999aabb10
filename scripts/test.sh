#!/usr/bin/env bash
# Set up a development install, check lint, formatting and types, and run the whole CPU test suite
# (tests, notebook, README example).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
python -m ruff check finetune_kit tests
python -m ruff format --check finetune_kit tests
python -m mypy
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# a cell may take minutes on a busy 2-core machine (the training cell): 15 minutes per cell, not 5
python -m pytest -m "not gpu" --nbmake --nbmake-timeout=900 notebooks/quickstart.ipynb tests "$@"
