"""Centralized DDP: the global-batch sampler, the all-reduce byte counter, and 2 gloo processes
(via torchrun) ending with the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from fedcxr.checkpoint import load_checkpoint
from fedcxr.labels import FINDINGS
from fedcxr.models import build_model
from fedcxr.sitedata import INDEX_COLUMNS
from fedcxr.train.commhook import AllReduceCounter, register_counter
from fedcxr.train.ddp import (
    CONFIG,
    METRICS,
    MODEL,
    TIMINGS,
    DDPLaunchError,
    DistEnv,
    launch_ddp,
    make_pooled_setup,
    make_rank_loader,
    set_loader_epoch,
    torchrun_command,
)
from fedcxr.train.ddpspec import DDPSpec, read_spec, write_spec
from fedcxr.train.loop import batch_to_device, plain_state_dict, threads_per_process, train_epoch
from fedcxr.train.sampler import GlobalBatchSampler, global_batches

SIZE = 32  # stored and trained resolution
N_SITE, TRAIN_SITE = 40, 32  # two sites: 64 pooled train rows, 8 val rows each
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    # seed_everything (inside make_pooled_setup) switches deterministic kernels on; undo it.
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def make_site(folder: Path, seed: int) -> Path:
    """N_SITE noisy SIZE x SIZE images, the first TRAIN_SITE in 'train'; odd rows are positive."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    positive = np.arange(N_SITE) % 2
    images = rng.normal(80.0, 20.0, (N_SITE, SIZE, SIZE))
    images[positive == 1, 8:20, 8:20] += 120.0
    np.save(folder / "images.npy", np.clip(images, 0, 255).astype(np.uint8))
    index = pd.DataFrame(
        {
            "image_id": [f"{seed}{i:07d}_000.png" for i in range(N_SITE)],
            "patient_id": [f"s{seed}p{i}" for i in range(N_SITE)],
            "split": np.where(np.arange(N_SITE) < TRAIN_SITE, "train", "val"),
            **{f: rng.integers(0, 2, N_SITE) for f in FINDINGS},
            "age": 50,
            "sex": "F",
            "view": "PA",
        }
    )
    index["Pneumonia"] = positive
    index.loc[:, list(INDEX_COLUMNS)].to_csv(folder / "index.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp_sites")
    return make_site(root / "site_a", 1), make_site(root / "site_b", 2)


def tiny_spec(sites: tuple[Path, ...], out: Path, **overrides) -> DDPSpec:
    values = {
        "data": sites,
        "out": out,
        "task": "pneumonia",
        "arch": "smallcnn",
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "image_size": SIZE,
        "seed": 7,
        "augment": True,  # drawn per (seed, epoch, pooled index): the same on every rank
        "dp_safe": True,  # GroupNorm: BatchNorm statistics would depend on the split
    }
    return DDPSpec(**{**values, **overrides})


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def train_one_process(
    spec: DDPSpec, threads: int = 1
) -> tuple[dict[str, torch.Tensor], dict, list[float]]:
    """The reference: the shared pieces and loop, no DDP, world size 1, `threads` like a rank.

    Returns (final state, initial state, per-epoch losses).
    """
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    dataset, setup = make_pooled_setup(spec, cpu)
    initial = plain_state_dict(setup.model)
    loader = make_rank_loader(dataset, spec)
    losses = []
    for _ in range(spec.epochs):
        set_loader_epoch(loader, setup.epochs_done)
        losses.append(train_epoch(setup, loader).loss)
    return plain_state_dict(setup.model), initial, losses


def train_accumulating(
    spec: DDPSpec, world_size: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process doing what W ranks do: per step, each rank's slice of the global batch,
    its loss divided by W, gradients accumulated, then one optimizer step.

    DDP's all-reduce averages the ranks' gradients as (g_0 + ... + g_{W-1}) / W; scaling a
    backward pass by 1/W (a power of two here) is exact and a sum of two floats does not depend
    on its order, so with two ranks this reference is bit for bit what DDP computes.
    Returns (final state, per-epoch mean losses).
    """
    torch.set_num_threads(threads_per_process(world_size))
    dataset, setup = make_pooled_setup(spec, torch.device("cpu"))
    loaders = [make_rank_loader(dataset, spec, rank, world_size) for rank in range(world_size)]
    model, losses = setup.model, []
    for _ in range(spec.epochs):
        total, examples = 0.0, 0
        dataset.set_epoch(setup.epochs_done)
        for loader in loaders:
            set_loader_epoch(loader, setup.epochs_done)
        model.train()
        for slices in zip(*loaders, strict=True):
            setup.optimizer.zero_grad(set_to_none=True)
            for batch in slices:
                x, y = batch_to_device(batch, torch.device("cpu"))
                loss = setup.loss_fn(model(x).float(), y)
                (loss / world_size).backward()
                total, examples = total + loss.item() * len(x), examples + len(x)
            setup.optimizer.step()
        setup.epochs_done += 1
        losses.append(total / examples)
    return plain_state_dict(model), losses


# --- the sampler ----------------------------------------------------------------------------


def test_rank_slices_interleave_to_the_single_process_batches():
    n, batch = 64, 8
    one = GlobalBatchSampler(n, batch, seed=3)
    ranks = [GlobalBatchSampler(n, batch, rank=r, world_size=2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        single = list(one)
        assert single == global_batches(n, batch, 3, epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(b) == batch // 2 for r in per_rank for b in r)
        assert [a + b for a, b in zip(*per_rank, strict=True)] == single
        assert sorted(i for b in single for i in b) == list(range(n))  # each example once
        assert len(one) == len(ranks[0]) == len(single) == n // batch


def test_set_epoch_changes_the_order_deterministically():
    sampler = GlobalBatchSampler(64, 8, rank=1, world_size=2, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same batches
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    again = GlobalBatchSampler(64, 8, rank=1, world_size=2, seed=3)
    again.set_epoch(1)
    assert list(again) == second
    assert list(GlobalBatchSampler(64, 8, rank=1, world_size=2, seed=4)) != first


def test_last_partial_batch_is_cut_to_a_multiple_of_the_world_size():
    # 70 = 8 * 8 + 6: one process keeps all 6; 4 ranks take 1 each (2 skipped).
    assert [len(b) for b in GlobalBatchSampler(70, 8)] == [8] * 8 + [6]
    four = [list(GlobalBatchSampler(70, 8, rank=r, world_size=4)) for r in range(4)]
    assert all(len(r) == 9 and len(r[-1]) == 1 for r in four)
    assert len(GlobalBatchSampler(70, 8, world_size=4)) == 9
    # 66 = 8 * 8 + 2 < 4 ranks: the last batch is dropped on every rank alike.
    assert [len(list(GlobalBatchSampler(66, 8, rank=r, world_size=4))) for r in range(4)] == [8] * 4
    assert len(GlobalBatchSampler(66, 8, world_size=4)) == 8


def test_batch_size_must_divide_by_the_world_size(tmp_path):
    with pytest.raises(ValueError, match=r"divisible by the world size 3.*batch_size=8"):
        GlobalBatchSampler(64, 8, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(64, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="divisible"):
        torchrun_command(3, tiny_spec((tmp_path,), tmp_path / "out"))


# --- the counting hook (in this process, a 1-rank gloo group) -------------------------------


def test_counter_adds_every_bucket_of_every_step(sites, tmp_path, monkeypatch):
    spec = tiny_spec(sites, tmp_path / "unused", epochs=1, augment=False)
    torch.set_num_threads(1)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dataset, setup = make_pooled_setup(spec, torch.device("cpu"))
        ddp = DistributedDataParallel(setup.model)
        counter = register_counter(ddp)
        setup.model = ddp
        stats = train_epoch(setup, make_rank_loader(dataset, spec))
    finally:
        dist.destroy_process_group()
    assert stats.steps == 64 // 8
    assert counter.calls >= stats.steps  # at least one bucket per step
    assert counter.bytes == stats.steps * param_bytes(ddp.module) > 0
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_counter(torch.nn.Linear(2, 2))
    assert AllReduceCounter().bytes == 0


# --- the worker's spec file and command line ------------------------------------------------


def test_spec_survives_the_json_file(sites, tmp_path):
    spec = tiny_spec(sites, tmp_path / "out", lr=1e-4 / 3, augment=False, num_workers=1)
    path = write_spec(spec, tmp_path / "spec.json")
    assert read_spec(path) == spec
    data = json.loads(path.read_text())
    assert list(data) == [f.name for f in fields(DDPSpec)]
    assert data["data"] == [str(s) for s in sites] and data["out"] == str(tmp_path / "out")
    assert DDPSpec.from_json(spec.to_json()) == spec
    command = torchrun_command(2, spec, path)
    assert command[1:6] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
    ]
    assert command[-2:] == ["--spec", str(path)]
    with pytest.raises(RuntimeError, match="RANK"):
        DistEnv.from_env({})
    with pytest.raises(ValueError, match="duplicates"):
        tiny_spec((sites[0], sites[0]), tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "bogus: Unexpected keyword argument"),
        ({"out": None}, "out: Field required"),
        ({"epochs": "2"}, "epochs: Input should be a valid integer"),
        ({"augment": 1}, "augment: Input should be a valid boolean"),
        ({"data": [1]}, r"data\.0: Input should be a valid string"),
        ({"epochs": 0}, "epochs >= 1"),
    ],
)
def test_a_bad_spec_file_is_refused_naming_the_file_and_key(tmp_path, change, message):
    data = {**tiny_spec((tmp_path / "a",), tmp_path / "out").to_json(), **change}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    with pytest.raises(
        ValueError, match=f"invalid DDP spec in {re.escape(str(path))}: .*{message}"
    ):
        read_spec(path)


def test_a_spec_file_must_be_strict_json(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"data": ["a"], "out": "o", "lr": float("nan")}))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: lr: .*finite number"):
        read_spec(path)
    with pytest.raises(ValueError, match="Out of range float"):
        write_spec(tiny_spec((tmp_path,), tmp_path / "out", lr=float("inf")), path)
    with pytest.raises(FileNotFoundError, match=r"missing\.json not found"):
        read_spec(tmp_path / "missing.json")


def test_the_worker_explains_itself():
    proc = subprocess.run(
        [sys.executable, "-m", "fedcxr.train.ddp_worker", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--spec" in proc.stdout and "batch_size" in proc.stdout


@pytest.mark.slow  # a real torchrun launch: ~10 s of interpreter and torch start-up
def test_a_failed_launch_raises_with_the_output_tail(tmp_path):
    spec = tiny_spec((tmp_path / "no_such_site",), tmp_path / "out", epochs=1)
    with pytest.raises(DDPLaunchError, match=r"exited with 1(.|\n)*no_such_site"):
        launch_ddp(1, spec, timeout_s=LAUNCH_TIMEOUT_S)


# --- two processes == one process -----------------------------------------------------------


def test_two_gloo_processes_match_one_process(sites, tmp_path):
    spec = tiny_spec(sites, tmp_path / "ddp2")
    launch_ddp(2, spec, timeout_s=LAUNCH_TIMEOUT_S)
    ref_state, initial, ref_losses = train_one_process(spec)
    n_param_bytes = param_bytes(build_model(spec.arch, 1, dp_safe=True))

    checkpoint = load_checkpoint(spec.out / MODEL)
    assert checkpoint.round == spec.epochs and checkpoint.meta["world_size"] == 2
    state = load_file(str(spec.out / MODEL))
    assert state.keys() == ref_state.keys()
    diff = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    moved = max(float((ref_state[k] - v).abs().max()) for k, v in initial.items())
    print(f"max |w_ddp2 - w_single| = {diff:.3e} (training moved weights by up to {moved:.3e})")
    assert moved > 1e-3  # the comparison is not between two untrained models
    # Against one process that accumulates the two rank slices of every global batch: equal
    # bit for bit. (Against the plain loop on the whole global batch the weights agree only to
    # rounding, and Adam's first steps turn a rounding-level difference in a gradient that is
    # nearly zero (dead units) into a full +-lr step: max |dw| 4e-6 with scalar CPU kernels,
    # 7e-4 after one epoch with AVX2/AVX-512 ones, so that comparison depends on the CPU. The
    # per-epoch losses below still match the plain loop to 1e-5.)
    acc_state, acc_losses = train_accumulating(spec, 2)
    for k in acc_state:
        assert torch.equal(state[k], acc_state[k]), (
            f"{k}: max |w_ddp2 - w_accumulated| = {(state[k] - acc_state[k]).abs().max():.3e}"
        )

    metrics = json.loads((spec.out / METRICS).read_text())
    steps = spec.epochs * 64 // spec.batch_size
    assert metrics["world_size"] == 2 and metrics["steps"] == steps
    assert metrics["per_rank_batch"] == 4 and metrics["train_examples"] == 64
    # gloo: one bucket payload per step holds every parameter's float32 gradient.
    assert metrics["allreduce_bytes_per_rank"] == steps * n_param_bytes
    assert metrics["allreduce_bytes"] == 2 * steps * n_param_bytes
    assert sum(e["allreduce_bytes"] for e in metrics["epochs"]) == metrics["allreduce_bytes"]
    ddp_losses = [e["loss"] for e in metrics["epochs"]]
    np.testing.assert_allclose(ddp_losses, acc_losses, rtol=1e-6)
    np.testing.assert_allclose(ddp_losses[0], ref_losses[0], rtol=1e-5)  # same start, same data
    assert [e["examples"] for e in metrics["epochs"]] == [64] * spec.epochs
    timings = json.loads((spec.out / TIMINGS).read_text())
    assert len(timings["epoch_seconds"]) == spec.epochs and timings["seconds_total"] > 0
    config = json.loads((spec.out / CONFIG).read_text())
    assert config["batch_size"] == 8 and config["world_size"] == 2
    assert os.path.samefile(config["data"][0], sites[0])


@pytest.mark.slow
def test_one_torchrun_process_is_bitwise_the_plain_loop(sites, tmp_path):
    spec = tiny_spec(sites, tmp_path / "ddp1", epochs=1)
    launch_ddp(1, spec, timeout_s=LAUNCH_TIMEOUT_S)
    ref_state, _, _ = train_one_process(spec, threads=threads_per_process(1))
    state = load_file(str(spec.out / MODEL))
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
