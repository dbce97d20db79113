"""Federated runs end to end: real site processes over mutual TLS, DP accounting, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedcxr.audit import verify
from fedcxr.cli import app
from fedcxr.config import Params, load_params
from fedcxr.federation.runner import run_federation
from fedcxr.labels import FINDINGS
from fedcxr.sitedata import INDEX_COLUMNS

SITES = ("site-a", "site-b", "site-c")
N_IMAGES = 24
SIZE = 32


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
            "split": "val" if i >= 16 else "train",
            "age": 50,
            "sex": "F",
            "view": "PA",
        }
        row.update({f: int(positive[i]) for f in FINDINGS})
        rows.append(row)
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    pd.DataFrame(rows).loc[:, list(INDEX_COLUMNS)].to_csv(folder / "index.csv", index=False)


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    for k, name in enumerate(SITES):
        make_site(root / name, k)
    return root


def tiny_params(folder: Path, **dp: Any) -> Params:
    data = {
        "seed": 7,
        "resize": {"size": SIZE},
        "model": {"arch": "smallcnn"},
        "train": {"image_size": SIZE, "batch_size": 8, "augment": False, "lr": 1e-3},
        "fl": {"rounds": 2, "local_epochs": 1},
        "dp": {"enabled": bool(dp), **dp},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_params(path)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


def federate(tmp: Path, sites_dir: Path, pki_dir: Path, **dp: Any) -> tuple[dict, Path]:
    params = tiny_params(tmp, **dp)
    out = tmp / "out"
    return run_federation(params, sites_dir, out, pki_dir, resume=False), out


@pytest.fixture(scope="module")
def plain_runs(sites_dir: Path, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return [federate(tmp_path_factory.mktemp(f"run{i}"), sites_dir, pki_dir) for i in range(2)]


def test_three_site_processes_two_rounds(plain_runs: list, sites_dir: Path, pki_dir: Path) -> None:
    summary, out = plain_runs[0]
    assert (out / "model.safetensors").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2] and summary["rounds"] == 2
    for record in history:
        assert sorted(record["sites"]) == list(SITES)
        for outcome in record["sites"].values():
            assert outcome["accepted"] and outcome["n_k"] == 16
            assert math.isfinite(outcome["metrics"]["train_loss"])
            assert outcome["bytes_sent"] > 0 and outcome["bytes_received"] > 0
    assert verify(out / "audit.jsonl").ok and summary["audit_ok"]
    for rnd in summary["per_round"]:
        assert rnd["val_auroc"] is not None and 0.0 <= rnd["val_auroc"] <= 1.0
        assert rnd["wall_s"] > 0
    # The resumed federation is already finished: no site is started, same model.
    params = load_params(out.parent / "params.yaml")
    again = run_federation(params, sites_dir, out, pki_dir, resume=True)
    assert again["model_sha256"] == summary["model_sha256"]


def test_same_params_give_bit_identical_weights(plain_runs: list) -> None:
    (first, out_a), (second, out_b) = plain_runs
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["model_sha256"] == second["model_sha256"]


@pytest.mark.slow  # a third federation (~35 s on 2 cores, mostly site-process start-up)
def test_dp_epsilon_composes_across_rounds(sites_dir: Path, pki_dir: Path, tmp_path: Path) -> None:
    summary, out = federate(tmp_path, sites_dir, pki_dir, noise_multiplier=1.0)
    history = json.loads((out / "history.json").read_text())
    for site in SITES:
        metrics = [h["sites"][site]["metrics"] for h in history]
        eps = [m["epsilon"] for m in metrics]
        assert 0 < eps[0] < eps[1], (site, eps)
        steps = 0
        for m in metrics:  # replay: one accountant over all steps so far, never reset
            steps += m["steps"]
            replay = RDPAccountant()
            replay.history = [(m["noise_multiplier"], m["sample_rate"], steps)]
            assert m["epsilon"] == pytest.approx(replay.get_epsilon(m["delta"]), rel=1e-9)
        assert [r["sites"][site]["epsilon"] for r in summary["per_round"]] == eps
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "dp_accounting" for e in events) == 2 * len(SITES)


@pytest.mark.parametrize("command", [["aggregator", "serve"], ["site", "run"]])
def test_cli_help_renders(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--help" in result.output
