"""Shared fixtures: NIH-format folders built on the fly and a runner for the DVC stage scripts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from nihfolder import SECRET_ENV, make_nih_folder
from stagecmd import stage_argv

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"


def write_params(workdir: Path, nih_dir: Path, **sections: dict) -> Path:
    """params.yaml for a stage run on nih_dir; sections override ingest/deid/resize keys."""
    params: dict = {
        "seed": 42,
        "data": {"source": "nih", "nih_dir": str(nih_dir)},
        "ingest": {"max_bad_fraction": 0.0, "verify_md5": True, "workers": 1},
        "deid": {"on_violation": "fail"},
        "resize": {"size": 32, "shard_images": 4, "workers": 1},
        "train": {"image_size": 32},  # <= resize.size, as every params file must have it
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=True))
    return path


def run_stage(
    workdir: Path, name: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run stages/<name>.py with cwd=workdir (it reads ./params.yaml, writes data/, reports/)."""
    full_env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    full_env.update(env or {})
    return subprocess.run(
        stage_argv(name),
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(name="run_stage")
def run_stage_fixture():
    return run_stage


@pytest.fixture(name="write_params")
def write_params_fixture():
    return write_params


@pytest.fixture
def clean_folder(tmp_path: Path) -> dict:
    """A 12-image NIH folder in the 2017 layout with nothing wrong in it."""
    return make_nih_folder(tmp_path / "nih")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run stage scripts in (separate from the source folder)."""
    path = tmp_path / "work"
    path.mkdir()
    return path
