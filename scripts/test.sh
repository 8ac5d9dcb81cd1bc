#!/usr/bin/env bash
# Install (scripts/install.sh) and run the whole test suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
ruff check .
PYTHONSAFEPATH=1 python -m pytest -q -ra --durations=25 "$@"   # the checkout off sys.path, as in install.sh
