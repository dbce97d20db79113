#!/usr/bin/env bash
# The test job: set up .venv if needed, lint, then run every test (slow end-to-end ones too).
# Fast suite only: `.venv/bin/pytest -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's browser test (tests/test_report_browser.py) needs headless Chromium: install it
# on Debian when run as root; when it is there, the test must run rather than skip.
command -v chromium >/dev/null || {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ||
      echo "[test] note: installing chromium failed; the browser test will be skipped"
  else
    echo "[test] note: chromium not found and not root (or no apt-get); the browser test" \
      "will be skipped. Install it with: sudo apt-get install -y chromium"
  fi
}
if command -v chromium >/dev/null; then export FEDCXR_REQUIRE_BROWSER=1; fi
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
pytest -n 2 "$@"
