#!/usr/bin/env bash
# Set up a development install and run the whole CPU test suite (tests, notebook, README example).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -m "not gpu" --nbmake notebooks/quickstart.ipynb tests "$@"
