"""A throw-away git + DVC repository of the pipeline (code, dvc.yaml, .dvc) for a test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FILES = ("dvc.yaml", ".dvcignore", ".gitignore")
FOLDERS = ("stages", "src", ".dvc")
# Left behind: bytecode, builds, DVC's cache and tmp, and machine-local DVC config.
IGNORE = ("__pycache__", "cache", "tmp", "*.egg-info", "*.local")
GIT_SETUP = (
    ("init", "-q"),
    ("config", "user.email", "test@localhost"),
    ("config", "user.name", "fedcxr test"),
)


def repo_params() -> dict:
    """The repository's params.yaml, as a dict for a test to change."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def pipeline_copy(repo: Path, params: dict) -> Path:
    """Create the folder `repo` with the pipeline's code and DVC files and `params` as its
    params.yaml; not yet a git repository (see `commit_all`)."""
    repo.mkdir()
    for name in FILES:
        shutil.copy(REPO / name, repo / name)
    for name in FOLDERS:
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns(*IGNORE))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def commit_all(repo: Path) -> Path:
    """Make `repo` a git repository (a test identity of its own) with everything in one commit."""
    for args in (*GIT_SETUP, ("add", "-A"), ("commit", "-qm", "pipeline under test")):
        result = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"git {args} failed:\n{result.stdout}\n{result.stderr}"
    return repo


def tiny_params(n_images: int = 48) -> dict:
    """repo_params() at the tiny size the end-to-end tests run: `n_images` synthetic images,
    resized to 64 px in 16-image shards and trained at 32 px for 2 epochs (2 rounds); the
    partition's sizes are taken as proportions of those images (partition.fit: scale)."""
    params = repo_params()
    params["data"]["synthetic"]["n_images"] = n_images
    params["resize"]["size"] = 64
    params["resize"]["shard_images"] = 16
    params["train"]["image_size"] = 32  # must stay <= resize.size
    params["train"]["epochs"] = 2  # a tiny, equal budget: 2 epochs = 2 rounds x 1 local epoch
    params["fl"]["rounds"] = 2
    params["partition"]["fit"] = "scale"
    return params
