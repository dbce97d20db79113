"""The data stages' outputs on a tiny committed configuration equal committed hashes: fails when
the environment drifts from requirements.lock (or the code changes what the stages write)."""

from __future__ import annotations

import json
from pathlib import Path

from drift import EXPECTED, run_data_stages


def test_data_stage_outputs_match_the_committed_hashes(tmp_path: Path) -> None:
    hashes = run_data_stages(tmp_path / "work")
    expected = json.loads(EXPECTED.read_text())
    assert len(expected) > 20  # every stage's files, not an empty listing
    differ = sorted(k for k in expected.keys() | hashes.keys() if expected.get(k) != hashes.get(k))
    assert not differ, (
        f"{len(differ)} of {len(expected)} data-stage outputs differ from {EXPECTED} "
        f"(first: {differ[:5]}). If the code changed them on purpose, regenerate with "
        "`python tests/drift.py --write`; otherwise the environment drifted: reinstall it with "
        "`rm -rf .venv && bash scripts/setup.sh`."
    )
