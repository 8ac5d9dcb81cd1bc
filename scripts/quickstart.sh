#!/usr/bin/env bash
# Install (scripts/install.sh) and run the embedded default job: `shardquant quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
shardquant quickstart "$@"
