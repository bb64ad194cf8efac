#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real backbone, real .pte files, real sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
