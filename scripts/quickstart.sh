#!/usr/bin/env bash
# Set up finetune_kit and run the offline quickstart on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve,metrics
HF_HUB_OFFLINE=1 finetune-kit quickstart "$@"
