#!/usr/bin/env bash
# Set up the project on a fresh machine: a .venv in the checkout with the pinned packages.
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.cpfs-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing pinned packages (torch ${TORCH_VERSION:-2.14.1} etc.; about a minute)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # requirements.lock pins every transitive package to the tested version.
    .venv/bin/python -m pip install --quiet -c requirements.lock -e '.[test]'
    echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
