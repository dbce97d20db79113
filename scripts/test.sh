#!/usr/bin/env bash
# The test job: set up .venv if needed, lint, then run every test (slow end-to-end ones too).
# Fast suite only: `.venv/bin/pytest -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
pytest -n 2 "$@"
