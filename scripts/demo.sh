#!/usr/bin/env bash
# Set everything up, then run the demo: train a reader's plugin, export it to ExecuTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec spa demo "$@"
