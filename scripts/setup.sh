#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras: pip upgraded first (the venv's own pip
# 23.x spends many minutes resolving these dependencies), versions pinned by constraints.txt, CPU torch from the
# pinned builds (torch 2.14.1 + torchvision 0.29.1; other torch builds break torchvision's import, which open_clip
# needs). scripts/test.sh calls this, so the README's set-up and CI's cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" -e ".[test,export]"
echo "set up: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
