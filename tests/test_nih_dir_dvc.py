"""data.nih_dir anywhere: DVC tracks the folder it names, inside the repository or not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvcrepo import commit_all, pipeline_copy, repo_params
from nihfolder import SECRET_ENV, make_nih_folder

pytestmark = pytest.mark.slow  # runs dvc in a temporary git repository


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[SECRET_ENV] = "0123456789abcdef" * 4  # a throw-away key: real data needs one
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _ingest_deps(repo: Path) -> dict[str, dict]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {dep["path"]: dep for dep in lock["stages"]["ingest"]["deps"]}


def test_dvc_tracks_an_nih_dir_outside_the_repository(tmp_path: Path):
    nih = tmp_path / "elsewhere" / "ChestX-ray14"
    make_nih_folder(nih)
    params = repo_params()
    params["data"].update(source="nih", nih_dir=str(nih))
    params["ingest"]["workers"] = 1
    repo = commit_all(pipeline_copy(tmp_path / "repo", params))
    _run(["fedcxr", "check-params"], repo)

    ran = _run(["dvc", "repro", "ingest"], repo)
    assert "Running stage 'ingest'" in ran.stdout
    deps = _ingest_deps(repo)
    assert str(nih) in deps and deps[str(nih)]["md5"].endswith(".dir")
    assert "data/raw/nih" not in deps and "data/raw/synthetic" not in deps
    status = _run(["dvc", "status", "ingest"], repo).stdout
    assert "up to date" in status, status

    # A change in that folder is seen, and `dvc repro` reruns ingest for it.
    (nih / "images" / "notes.txt").write_text("a file added to the NIH folder\n")
    status = _run(["dvc", "status", "ingest"], repo).stdout
    assert "modified:" in status and str(nih) in status, status
    assert "Running stage 'ingest'" in _run(["dvc", "repro", "ingest"], repo).stdout


def test_the_embedded_default_still_depends_on_data_raw_synthetic(tmp_path: Path):
    params = repo_params()
    repo = commit_all(pipeline_copy(tmp_path / "repo", params))
    status = _run(["dvc", "status", "ingest", "resize"], repo).stdout
    assert "data/raw/synthetic" in status and "data/raw/nih" not in status, status
