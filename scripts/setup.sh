#!/usr/bin/env bash
# Creates .venv once and installs exactly requirements.lock (every package pinned and
# hash-checked), then fedcxr itself; a no-op when .venv already matches the lock.
# Update the lock after changing dependencies: `bash scripts/lock.sh` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP_VERSION=26.3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedcxr-installed
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.lock into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet "pip==$PIP_VERSION"
  # --require-hashes: a package whose bytes differ from the lock's is refused, not installed.
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
  # fedcxr itself, editable; its dependencies are the locked ones above, so nothing resolves.
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
# DVC experiments need a git identity; set one for this repository only if none is configured.
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config user.name >/dev/null || git config user.name "fedcxr user"
  git config user.email >/dev/null || git config user.email "fedcxr@localhost"
fi
