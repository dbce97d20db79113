#!/usr/bin/env bash
# Creates .venv once and installs fedcxr (pinned torch, dvc, dev tools); a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedcxr-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing fedcxr and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, pinned: an unpinned resolve would fetch a multi-GB build.
  .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
# DVC experiments need a git identity; set one for this repository only if none is configured.
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config user.name >/dev/null || git config user.name "fedcxr user"
  git config user.email >/dev/null || git config user.email "fedcxr@localhost"
fi
