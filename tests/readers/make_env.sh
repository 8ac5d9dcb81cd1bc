#!/usr/bin/env bash
# Create (once) the reference readers' virtual environment and print its python's path.
#
# The formats' own reference code lives in packages that cannot share shardquant's
# environment (gptqmodel pins a newer torch, autoawq an older transformers), so they get a
# venv of their own, from PyPI only: torch pinned first (like scripts/install.sh), then
# requirements.txt with --no-deps (every version pinned, so no resolver can swap torch).
# The venv lives in $SHARDQUANT_CACHE/readers (default ~/.cache/shardquant/readers), keyed by
# a hash of this script and the requirements, and is reused while they are unchanged. A lock
# makes concurrent callers wait for one build; a failed build leaves nothing behind.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
torch_spec="torch==${SHARDQUANT_TORCH:-2.13.0}"
key="$( (cat "$here/make_env.sh" "$here/requirements.txt"; echo "$torch_spec") | sha256sum | cut -c1-12)"
root="${SHARDQUANT_CACHE:-$HOME/.cache/shardquant}/readers"
venv="$root/venv-$key"
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  trap 'rm -rf "$venv"' ERR
  PY="${PYTHON:-python3.11}"
  command -v "$PY" >/dev/null 2>&1 || PY=python3
  # Built in place (a venv's scripts hold its absolute path); marked complete only at the end.
  "$PY" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q "$torch_spec" >&2
  GPTQMODEL_FORCE_BUILD=0 BUILD_CUDA_EXT=0 \
    "$venv/bin/python" -m pip install -q --no-deps -r "$here/requirements.txt" >&2
  "$venv/bin/python" -c "import torch, safetensors; print('readers: torch', torch.__version__)" >&2
  touch "$venv/.complete"
  trap - ERR
fi
echo "$venv/bin/python"
