"""The environment-drift check: run the real data stage scripts on a tiny committed configuration
and hash every file they write. `python tests/drift.py --write` regenerates expected.json."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from stagecmd import stage_argv

ROOT = Path(__file__).resolve().parents[1]
CASE = Path(__file__).resolve().parent / "fixtures" / "drift"
EXPECTED = CASE / "expected.json"
STAGES = ("synthesize", "ingest", "deid", "resize", "partition")


def run_data_stages(work: Path) -> dict[str, str]:
    """Run the data stages in `work` (a fresh folder) and return {relative path: sha256}."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(CASE / "params.yaml", work / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCXR_")}
    for stage in STAGES:
        done = subprocess.run(
            stage_argv(stage),
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"stage {stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {
        str(path.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((work / "data").rglob("*"))
        if path.is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite expected.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedcxr-drift"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    hashes = run_data_stages(args.work)
    if args.write:
        EXPECTED.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(hashes)} hashes to {EXPECTED}")
    else:
        expected = json.loads(EXPECTED.read_text())
        bad = sorted(k for k in expected.keys() | hashes.keys() if expected.get(k) != hashes.get(k))
        print(f"{len(hashes)} files, {len(bad)} differ" + "".join(f"\n  {k}" for k in bad))


if __name__ == "__main__":
    main()
