"""Every stage refuses bad params before it touches an output (names, YAML, world size)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stagecmd import stage_argv

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if not p.stem.startswith("_"))

pytestmark = pytest.mark.slow  # imports every stage (torch included) in one subprocess

# Runs each stage script as its dvc.yaml `cmd` would, in one process (imports are paid once),
# with torch.cuda showing GPUS GPUs; prints {stage: [exit code, stderr]} as JSON.
HARNESS = """
import contextlib, io, json, runpy, sys
import torch
GPUS = int(sys.argv[2])
torch.cuda.is_available = lambda: GPUS > 0
torch.cuda.device_count = lambda: GPUS
stages = sys.argv[1]
sys.path.insert(0, stages)
results = {}
for name, argv in json.loads(sys.argv[3]).items():
    sys.argv = argv
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(f"{stages}/{name}.py", run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""

# One file in each output folder a stage could remove or rewrite.
SENTINELS = (
    "data/raw/synthetic/keep.txt",
    "data/ingest/keep.txt",
    "data/deid/keep.txt",
    "data/resized/keep.txt",
    "data/sites/keep.txt",
    "data/test/keep.txt",
    "models/federated/multilabel/s42/checkpoint.safetensors",
    "models/federated/multilabel/s42/audit.jsonl",
    "models/federated_dp/multilabel/s42/audit.jsonl",
    "models/centralized/multilabel/s42/keep.txt",
    "models/single_node/multilabel/s42/keep.txt",
    "models/local/multilabel/s42/keep.txt",
    "reports/partition.json",
    "reports/metrics.json",
    "reports/report.md",
)


def _run(workdir: Path, stages: list[str], gpus: int = 0) -> dict[str, list]:
    # A matrix stage runs its first entry: the one the sentinels above stand in.
    argvs = {name: stage_argv(name, task="multilabel", seed=42)[1:] for name in stages}
    for rel in SENTINELS:
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"sentinel {rel}\n")
    result = subprocess.run(
        [sys.executable, "-c", HARNESS, str(REPO / "stages"), str(gpus), json.dumps(argvs)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for rel in SENTINELS:
        assert (workdir / rel).read_text() == f"sentinel {rel}\n", f"{rel} was touched"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_stage_refuses_unknown_names_and_broken_yaml_before_touching_outputs(tmp_path):
    bad = tmp_path / "names"
    bad.mkdir()
    (bad / "params.yaml").write_text(
        yaml.safe_dump({"model": {"arch": "vgg16"}, "fl": {"strategy": "fedsgd"}})
    )
    for name, (code, err) in _run(bad, STAGES).items():
        assert code == 1, (name, err)
        assert "'model.arch'" in err and "'vgg16'" in err and "'fl.strategy'" in err, name
        assert "Traceback" not in err, name

    tab = tmp_path / "tab"
    tab.mkdir()
    (tab / "params.yaml").write_text("seed: 42\nmodel:\n\tarch: smallcnn\n")
    for name, (code, err) in _run(tab, STAGES).items():
        assert code == 1, (name, err)
        assert err.strip().splitlines() == [
            f"[{name}] failed: params.yaml:3:1: invalid YAML: found character '\\t' that "
            "cannot start any token (a tab: YAML indents with spaces)"
        ], name


def test_train_centralized_refuses_more_processes_than_gpus_before_removing_its_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"ddp_world_size": 2}}))
    code, err = _run(tmp_path, ["train_centralized"], gpus=1)["train_centralized"]
    assert code == 1
    assert "'train.ddp_world_size'" in err and "1 CUDA GPU" in err and "found 2" in err
    assert "params.yaml" in err
