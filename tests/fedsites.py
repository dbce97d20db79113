"""Tiny learnable site folders and helpers to run (and kill) the federated training stage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from stagecmd import stage_argv

from fedcxr.labels import FINDINGS
from fedcxr.sitedata import INDEX_COLUMNS

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "train_federated.py"
SITES = ("site-a", "site-b", "site-c")
N_IMAGES = 24
N_TRAIN = 16  # rows 0-15 are 'train', 16-23 'val' (make_site)
SIZE = 32
SEED = 7
TASK = "multilabel"


def make_site(folder: Path, seed: int) -> None:
    """24 learnable images: a bright square means every finding (and Pneumonia) is present."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    positive = np.arange(N_IMAGES) % 2 == 1
    images[positive, 8:24, 8:24] = 230
    rows = []
    for i in range(N_IMAGES):
        row: dict[str, Any] = {
            "image_id": f"{folder.name}-{i:03d}.png",
            "patient_id": f"{folder.name}-p{i}",
            "split": "val" if i >= N_TRAIN else "train",
            "age": 50,
            "sex": "F",
            "view": "PA",
        }
        row.update({f: int(positive[i]) for f in FINDINGS})
        rows.append(row)
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    pd.DataFrame(rows).loc[:, list(INDEX_COLUMNS)].to_csv(folder / "index.csv", index=False)


def make_sites(root: Path) -> Path:
    for k, name in enumerate(SITES):
        make_site(root / name, k)
    return root


def params_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """Tiny federation params (smallcnn at 32 px, 3 sites of 16 training images)."""
    data: dict[str, Any] = {
        "seed": SEED,
        "task": TASK,
        "resize": {"size": SIZE},
        "model": {"arch": "smallcnn"},
        "train": {
            "image_size": SIZE,
            "batch_size": 8,
            "augment": False,
            "lr": 1e-3,
            "lr_schedule": "constant",  # two rounds: what they learn is not halved by a decay
            "seeds": [SEED],
        },
        "fl": {"rounds": 2, "local_epochs": 1},
        "dp": {"enabled": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return data


def write_params(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    return path


def stage_workdir(folder: Path, data: dict[str, Any]) -> Path:
    """A folder to run stages/train_federated.py in: params.yaml and data/sites/<site>."""
    make_sites(folder / "data" / "sites")
    write_params(folder, data)
    return folder


def run_dir(workdir: Path, dp: bool = False) -> Path:
    return workdir / "models" / ("federated_dp" if dp else "federated") / TASK / f"s{SEED}"


def stage_cmd(dp: bool = False) -> list[str]:
    """The stage's command as dvc.yaml runs it, for this module's task and seed."""
    return stage_argv("train_federated_dp" if dp else "train_federated", task=TASK, seed=SEED)


def run_stage(workdir: Path, dp: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the stage by hand in `workdir` (as `python stages/train_federated.py` would)."""
    return subprocess.run(
        stage_cmd(dp), cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False
    )


def audit_entries(path: Path) -> list[dict[str, Any]]:
    """The complete lines of an audit log that may be being written."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines]


def kill_stage_when(
    workdir: Path, when: Callable[[list[dict[str, Any]]], bool], dp: bool = False
) -> str:
    """Start the stage in its own session, SIGKILL it and its site processes as soon as
    `when(audit entries)` holds; the stage's output so far."""
    log = workdir / "killed-stage.log"
    audit = run_dir(workdir, dp) / "audit.jsonl"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            stage_cmd(dp), cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600
        while not when(audit_entries(audit)):
            if proc.poll() is not None:
                raise AssertionError(
                    f"the stage ended (rc {proc.returncode}) before it could be killed:\n"
                    f"{log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("the stage never reached the point where it is killed")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return log.read_text()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
