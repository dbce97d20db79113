"""End to end: the data stages under `dvc repro` in a temporary git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dvcrepo import commit_all, pipeline_copy, tiny_params

DATA_STAGES = ("synthesize", "ingest", "deid", "resize", "partition")

pytestmark = pytest.mark.slow


def _run(args, cwd, check=True):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FEDCXR_DEID_SECRET", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _lock_hashes(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        f"{stage}:{out['path']}": out.get("md5")
        for stage, body in lock["stages"].items()
        for out in body.get("outs", [])
    }


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    return commit_all(pipeline_copy(tmp_path / "repo", tiny_params(48)))


def test_dvc_repro_data_stages_cached_and_byte_identical(tiny_repo: Path):
    first = _run(["dvc", "repro", *DATA_STAGES], tiny_repo)
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    hashes = _lock_hashes(tiny_repo)
    assert all(hashes.values()), hashes

    # The outputs are what the stages promise.
    for site in "abcde":
        folder = tiny_repo / "data" / "sites" / f"site-{site}"
        images = np.load(folder / "images.npy", mmap_mode="r")
        index = pd.read_csv(folder / "index.csv")
        assert images.shape[1:] == (64, 64) and len(index) == len(images)
    report = json.loads((tiny_repo / "reports" / "partition.json").read_text())
    assert report["total_images"] == 48 and report["patient_overlap_total"] == 0
    deid = json.loads((tiny_repo / "reports" / "deid.json").read_text())
    assert deid["passed"] and deid["checks"]["patient_ids"]["development_secret"]

    # split-plan on the raw metadata plans exactly the split the stage built from
    # pseudonymized rows (map pseudonymous image ids back through deid -> ingest manifest).
    _run(
        ["fedcxr", "split-plan", "data/raw/synthetic/Data_Entry_2017.csv", "--out", "PLAN.json"],
        tiny_repo,
    )
    planned = json.loads((tiny_repo / "PLAN.json").read_text())["assignment"]
    manifest = pd.read_csv(tiny_repo / "data/ingest/manifest.csv", dtype=str)
    deid_meta = pd.read_csv(tiny_repo / "data/deid/metadata.csv", dtype=str)
    raw_name = dict(
        zip(
            deid_meta["image_id"],
            manifest["image_index"].to_numpy()[deid_meta["manifest_row"].astype(int)],
            strict=True,
        )
    )
    built = {}
    for folder in [*(tiny_repo / "data/sites").iterdir(), tiny_repo / "data/test"]:
        name = "test" if folder.name == "test" else folder.name
        for image_id in pd.read_csv(folder / "index.csv", dtype=str)["image_id"]:
            built[raw_name[image_id]] = name
    assert built == planned
    (tiny_repo / "PLAN.json").unlink()

    # A second repro reruns nothing.
    second = _run(["dvc", "repro", *DATA_STAGES], tiny_repo)
    assert "Running stage" not in second.stdout
    status = _run(["dvc", "status", *DATA_STAGES], tiny_repo).stdout.strip()
    assert status.startswith("Data and pipelines are up"), status

    # Deleting every output and the cache, then rebuilding, gives byte-identical outputs.
    shutil.rmtree(tiny_repo / "data")
    shutil.rmtree(tiny_repo / ".dvc" / "cache", ignore_errors=True)
    _run(["dvc", "repro", "--force", *DATA_STAGES], tiny_repo)
    assert _lock_hashes(tiny_repo) == hashes


def test_dvc_exp_run_reruns_only_touched_stages(tiny_repo: Path):
    _run(["dvc", "repro", *DATA_STAGES], tiny_repo)
    _run(["git", "add", "-A"], tiny_repo)
    _run(["git", "commit", "-qm", "lock"], tiny_repo)
    result = _run(["dvc", "exp", "run", "partition", "-S", "partition.val_fraction=0.2"], tiny_repo)
    ran = {s for s in DATA_STAGES if f"Running stage '{s}'" in result.stdout}
    assert ran == {"partition"}, result.stdout
    result = _run(["dvc", "exp", "run", "partition", "-S", "resize.size=32"], tiny_repo)
    ran = {s for s in DATA_STAGES if f"Running stage '{s}'" in result.stdout}
    assert ran == {"resize", "partition"}, result.stdout


TRAIN_STAGES = (
    "train_federated",
    "train_federated_dp",
    "train_single_node",
    "train_centralized",
    "train_local",
)


def _ran(stdout: str) -> set[str]:
    """Stages that DVC ran (matrix items by full name, e.g. train_federated@multilabel-42)."""
    return {
        line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")
    }


def _restored(stdout: str) -> set[str]:
    """Stages that DVC restored from its run cache instead of running them."""
    return {
        line.split("'")[1]
        for line in stdout.splitlines()
        if line.startswith("Stage '") and "is cached - skipping run" in line
    }


def _expanded(stages: set[str], params: dict) -> set[str]:
    """Stage names as DVC prints them: a training stage once per matrix item (task-seed)."""
    items = [f"{t}-{s}" for t in params["study"]["tasks"] for s in params["train"]["seeds"]]
    matrix = stages & set(TRAIN_STAGES)
    return {f"{s}@{item}" for s in matrix for item in items} | (stages - matrix)


def _macro_auroc_by_hand(repo: Path, config: str, seeds: list[int]) -> float:
    """Mean over seeds of sklearn's AUROC averaged over the findings with both classes in
    data/test, from each run's saved model."""
    import torch
    from sklearn.metrics import roc_auc_score

    from fedcxr.evaluation.evaluate import load_model
    from fedcxr.runs import run_dir
    from fedcxr.sitedata import SiteData
    from fedcxr.train.data import XrayDataset, make_loader
    from fedcxr.train.loop import predict

    family, site = (
        ("local", config.removeprefix("local_")) if "local_" in config else (config, None)
    )
    test = SiteData.open(repo / "data/test")
    per_seed = []
    for seed in seeds:
        folder = run_dir(repo / "models", family, "multilabel", seed, site)
        model, card = load_model(folder, torch.device("cpu"))
        data = XrayDataset.from_split([test], "test", "multilabel", card.image_size)
        probs, labels = predict(model, make_loader(data, 8, shuffle=False), torch.device("cpu"))
        both = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
        per_seed.append(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in both]))
    return float(np.mean(per_seed))


def test_study_pipeline_and_local_epochs_ablation(tiny_repo: Path):
    """The whole study on a small sample: every configuration, evaluate and report; then
    `dvc exp run -S fl.local_epochs=2` reruns only federated training and what follows, and
    going back to 1 reproduces the first metrics exactly."""
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["data"]["synthetic"]["n_images"] = 240
    params["evaluate"]["n_boot"] = 200
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = _run(["dvc", "repro"], tiny_repo)
    everything = _expanded({*DATA_STAGES, *TRAIN_STAGES, "evaluate", "report"}, params)
    assert _ran(first.stdout) == everything, first.stdout
    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    # The 240 images (pneumonia enriched, 3 per patient) leave a few pneumonia positives in the
    # 69-image test set: both tasks are evaluated, and every run records its learning curve.
    assert "skipping task" not in first.stderr
    for config in ("federated", "single_node", "centralized", "local_site-a"):
        assert set(metrics[config]) == {"multilabel", "pneumonia"}
        assert metrics[config]["multilabel"]["training"]["epochs"] == 2
        # the number evaluate reports is the AUROC of that configuration's trained models on
        # data/test, recomputed here with sklearn (a wrong model, split or label column fails)
        want = _macro_auroc_by_hand(tiny_repo, config, params["train"]["seeds"])
        assert metrics[config]["multilabel"]["auroc_macro"] == pytest.approx(want, abs=1e-9)
    assert "federated_vs_single_node" in metrics["comparisons"]["multilabel"]
    efficiency = json.loads((tiny_repo / "reports/efficiency.json").read_text())
    assert efficiency["federated"]["multilabel"]["comm_kind"] == "grpc_wire"
    assert efficiency["centralized"]["multilabel"]["comm_bytes"] > 0
    html = (tiny_repo / "reports/report.html").read_text()
    assert "Table 1" in html and "data:image/png;base64," in html and 'src="http' not in html
    _run(["git", "add", "-A"], tiny_repo)
    _run(["git", "commit", "-qm", "study"], tiny_repo)

    # fl.local_epochs is a parameter of federated training only (dvc.yaml): exactly the two
    # federated trainings, every (task, seed) of each, and what reads their models rerun.
    touched = {"train_federated", "train_federated_dp", "evaluate", "report"}
    changed = _run(["dvc", "exp", "run", "-S", "fl.local_epochs=2"], tiny_repo)
    assert _ran(changed.stdout) == _expanded(touched, params), changed.stdout
    assert not _restored(changed.stdout), changed.stdout  # new params: nothing to restore
    diff = _run(["dvc", "metrics", "diff", "--json"], tiny_repo).stdout
    assert "federated.multilabel.auroc_macro" in diff, diff

    # Back to 1: the same stages again (the trainings' persisted outputs are never restored
    # from the run cache; evaluate and report may be), and the first metrics exactly.
    back = _run(["dvc", "exp", "run", "-S", "fl.local_epochs=1"], tiny_repo)
    ran, restored = _ran(back.stdout), _restored(back.stdout)
    assert ran | restored == _expanded(touched, params) and not ran & restored, back.stdout
    assert _expanded({"train_federated", "train_federated_dp"}, params) <= ran, back.stdout
    again = json.loads((tiny_repo / "reports/metrics.json").read_text())
    assert again == metrics
