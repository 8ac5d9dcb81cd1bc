#!/usr/bin/env bash
# Create .venv (if missing) and install shardquant with its test extras.
# torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of the interpreter package.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  else
    echo "install.sh: $PY lacks venv; install python3-venv" >&2; exit 1
  fi
fi
bash scripts/install-services.sh   # slurm-wlm and munge, as root with apt-get only
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q "torch==${SHARDQUANT_TORCH:-2.13.0}"
python -m pip install -q -e ".[test]"
# DeepSpeed compiles its async I/O op (cluster.spill: aio) on first use, in minutes: build it here,
# once per environment (.venv/torch_extensions), rather than inside a test. Needs libaio-dev.
# PYTHONSAFEPATH: `python -c` would put the checkout first on sys.path, and its kernels/ folder would
# shadow the `kernels` package transformers imports (the package is shardquant.kernels).
export PYTHONSAFEPATH=1
python -c "from shardquant.execution import spill; spill.aio_problem() or spill.aio_op()" \
  || echo "install.sh: DeepSpeed's async I/O op did not build; the cluster.spill aio tests will fail" >&2
python -c "import shardquant, torch; print(f'shardquant {shardquant.__version__} with torch {torch.__version__}')"
