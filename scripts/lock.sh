#!/usr/bin/env bash
# Re-resolves requirements.lock from pyproject.toml (every dependency pinned, with hashes, for
# CPython 3.11 on Linux x86_64). Run it after changing dependencies in pyproject.toml, then
# `bash scripts/setup.sh` installs exactly the new lock, and commit both files together.
# Extra arguments go to pip-compile, e.g. `bash scripts/lock.sh --upgrade-package numpy`.
# pip-compile (pip-tools) is used rather than uv because it resolves through pip, and so sees the
# same indexes and local wheel folders that pip install will use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools"
"$tools/bin/python" -m pip install --quiet "pip-tools==7.6.2"
"$tools/bin/pip-compile" --quiet --generate-hashes --extra dev --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml
echo "[lock] requirements.lock written; run 'bash scripts/setup.sh' to install it"
