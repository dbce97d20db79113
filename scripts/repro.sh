#!/usr/bin/env bash
# The main job: set up .venv if needed, then rebuild the whole pipeline with `dvc repro`.
# Extra arguments go to dvc repro (e.g. `bash scripts/repro.sh partition`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
