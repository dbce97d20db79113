"""Centralized multi-node training: the shared loop under DistributedDataParallel, via torchrun.

Each process runs `train_ddp`: the pooled train splits of the given site folders, the model
and optimizer from `make_setup`, DDP around the model, and `train_epoch` over a
`GlobalBatchSampler`, so W processes take exactly the steps one process takes with the same
global batch (rank r trains on its batch_size / W slice; DDP averages the gradients).

BatchNorm: DDP keeps per-rank batch statistics (each rank normalises over its own slice) and
broadcasts rank 0's running buffers every step, so a BatchNorm model under DDP is not the
single-process model. `dp_safe=True` builds the GroupNorm variant, whose result does not
depend on how a batch is split; the equality tests use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import fedcxr
from fedcxr.checkpoint import save_checkpoint
from fedcxr.config import resolve_world_size
from fedcxr.models import build_model, num_classes_for
from fedcxr.sitedata import INDEX, SiteData
from fedcxr.stageio import write_json
from fedcxr.tensorfile import MODEL, State
from fedcxr.train.commhook import register_counter
from fedcxr.train.data import XrayDataset, loader_workers
from fedcxr.train.ddpspec import SPEC_FILE, DDPSpec, write_spec
from fedcxr.train.loop import (
    TrainSetup,
    make_setup,
    pick_device,
    plain_state_dict,
    scheduled_lr,
    seed_everything,
    set_lr,
    threads_per_process,
    train_epoch,
)
from fedcxr.train.sampler import GlobalBatchSampler
from fedcxr.train.validate import spec_validator

WORKER_MODULE = "fedcxr.train.ddp_worker"
METRICS = "metrics.json"  # deterministic: loss, steps, bytes (safe for `dvc metrics diff`)
TIMINGS = "timings.json"  # seconds, kept apart so metric diffs are not noise
CONFIG = "config.json"  # the resolved DDPSpec and world size
TAIL_CHARS = 4000
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DDPLaunchError(RuntimeError):
    """torchrun exited non-zero or timed out; the message carries the tail of its output."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as torchrun's environment variables give it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistEnv:
        env = dict(os.environ if env is None else env)
        missing = [k for k in ENV_KEYS if k not in env]
        if missing:
            raise RuntimeError(
                f"expected torchrun's environment variables {list(ENV_KEYS)}, found {missing} "
                f"missing; start the worker with `torchrun --standalone --nproc_per_node=W -m "
                f"{WORKER_MODULE} ...` (or launch_ddp)"
            )
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env["LOCAL_RANK"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError as exc:
            raise RuntimeError(
                f"expected integer RANK/WORLD_SIZE/LOCAL_RANK, found {exc}"
            ) from None
        return cls(rank, world, local, local_world)


# --- building blocks (shared with the single-process reference) ----------------------------


def pooled_train_set(spec: DDPSpec) -> XrayDataset:
    """The train splits of spec.data, pooled in the given folder order (index = pooled row)."""
    sites = [SiteData.open(folder) for folder in spec.data]
    dataset = XrayDataset.from_split(
        sites, "train", spec.task, spec.image_size, augment=spec.augment, seed=spec.seed
    )
    if len(dataset) == 0:
        raise ValueError(
            f"expected rows with split 'train' in {[str(f / INDEX) for f in spec.data]}, found none"
        )
    return dataset


def make_pooled_setup(spec: DDPSpec, device: torch.device) -> tuple[XrayDataset, TrainSetup]:
    """seed_everything(spec.seed), the pooled train set, then model + optimizer (make_setup)."""
    seed_everything(spec.seed)
    dataset = pooled_train_set(spec)
    model = build_model(spec.arch, num_classes_for(spec.task), spec.pretrained, spec.dp_safe)
    return dataset, make_setup(model, spec.train_config(), spec.task, dataset.labels, device)


def make_rank_loader(
    dataset: XrayDataset, spec: DDPSpec, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """A DataLoader over rank's slices of the global batches (world_size=1: one process)."""
    sampler = GlobalBatchSampler(
        len(dataset), spec.batch_size, rank=rank, world_size=world_size, seed=spec.seed
    )
    workers = loader_workers(spec.num_workers, processes=world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # kept workers would not see the dataset's set_epoch
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's batch sampler which epoch comes (train_epoch sets the dataset's)."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, GlobalBatchSampler):
        raise TypeError(
            f"expected a loader from make_rank_loader (GlobalBatchSampler), found "
            f"{type(sampler).__name__}"
        )
    sampler.set_epoch(epoch)


def _device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {env.rank}: expected a GPU for LOCAL_RANK={env.local_rank}, found "
                f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return pick_device(threads_per_process(env.local_world_size))


def _reduce(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


# --- the worker -----------------------------------------------------------------------------


def train_ddp(spec: DDPSpec, env: DistEnv | None = None) -> dict[str, Any]:
    """Run in every torchrun process; rank 0 writes model, metrics, timings and config.

    Returns the run's summary (the same on every rank): per-epoch loss (mean over all
    examples of all ranks), steps, max-over-ranks seconds and all-reduce bytes (summed over
    ranks; `allreduce_bytes_per_rank` is one rank's share).
    """
    env = env or DistEnv.from_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _device(env)
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        return _train(spec, env, device, backend)
    finally:
        dist.destroy_process_group()


def _train(spec: DDPSpec, env: DistEnv, device: torch.device, backend: str) -> dict[str, Any]:
    start = time.perf_counter()
    dataset, setup = make_pooled_setup(spec, device)
    loader = make_rank_loader(dataset, spec, env.rank, env.world_size)
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(setup.model, device_ids=ids)
    counter = register_counter(ddp)
    ddp_setup = replace(setup, model=ddp)
    epochs: list[dict[str, Any]] = []
    bytes_before = 0.0
    # Rank 0 validates after each epoch (the learning curve); the others wait at the next
    # all-reduce, so the curve costs the ranks the same wall time but no extra traffic.
    validate = spec_validator(spec, device) if env.rank == 0 else None
    for _ in range(spec.epochs):
        set_loader_epoch(loader, ddp_setup.epochs_done)
        lr = scheduled_lr(spec.lr, ddp_setup.epochs_done, spec.epochs, spec.lr_schedule)
        set_lr(ddp_setup.optimizer, lr)
        stats = train_epoch(ddp_setup, loader)
        loss_sum, examples, bytes_total = _reduce(
            [stats.loss * stats.examples, stats.examples, counter.bytes], device, dist.ReduceOp.SUM
        )
        (seconds,) = _reduce([stats.seconds], device, dist.ReduceOp.MAX)
        epochs.append(
            {
                "epoch": ddp_setup.epochs_done,
                "loss": loss_sum / max(examples, 1.0),
                "examples": int(examples),
                "steps": stats.steps,
                "allreduce_bytes": int(bytes_total - bytes_before),
                "seconds": seconds,
                "val_auroc": validate(ddp.module) if validate is not None else None,
            }
        )
        bytes_before = bytes_total
        if env.rank == 0:
            e = epochs[-1]
            print(
                f"[ddp] epoch {e['epoch']}/{spec.epochs} loss {e['loss']:.4f} "
                f"steps {e['steps']} seconds {e['seconds']:.2f}",
                flush=True,
            )
    summary = {
        "world_size": env.world_size,
        "backend": backend,
        "device": device.type,
        "global_batch": spec.batch_size,
        "per_rank_batch": spec.batch_size // env.world_size,
        "train_examples": len(dataset),
        "epochs": epochs,
        "steps": sum(e["steps"] for e in epochs),
        "final_loss": epochs[-1]["loss"],
        "curve": [[e["epoch"], e["val_auroc"]] for e in epochs] if spec.val_data else [],
        "allreduce_bytes": int(bytes_before),
        "allreduce_bytes_per_rank": counter.bytes,
        "allreduce_calls_per_rank": counter.calls,
        "seconds_total": time.perf_counter() - start,
    }
    if env.rank == 0:
        write_outputs(spec, summary, plain_state_dict(ddp.module))
    dist.barrier()
    return summary


def write_outputs(spec: DDPSpec, summary: dict[str, Any], state: State) -> None:
    """model.safetensors (checkpoint, round = epochs), metrics.json, timings.json, config.json."""
    out = spec.out
    meta = {"kind": "centralized_ddp", "world_size": summary["world_size"], **spec.to_json()}
    meta = json.loads(json.dumps(meta))  # plain JSON types only
    save_checkpoint(out / MODEL, state, spec.epochs, meta)
    timing_keys = ("seconds", "seconds_total")
    metrics = {k: v for k, v in summary.items() if k not in timing_keys and k != "epochs"}
    metrics["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in summary["epochs"]]
    write_json(out / METRICS, metrics)
    write_json(
        out / TIMINGS,
        {
            "world_size": summary["world_size"],
            "device": summary["device"],
            "epoch_seconds": [e["seconds"] for e in summary["epochs"]],
            "seconds_total": summary["seconds_total"],
        },
    )
    write_json(out / CONFIG, {"world_size": summary["world_size"], **spec.to_json()})


# --- launching ------------------------------------------------------------------------------


def cuda_gpu_count() -> int:
    """CUDA GPUs this machine gives torch (0 without CUDA: the run uses gloo on CPU)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine_world_size(value: int | Literal["auto"]) -> int:
    """train.ddp_world_size resolved on this machine (config.resolve_world_size); a count above
    its GPUs is a ConfigError naming the key and the count."""
    return resolve_world_size(value, cuda_gpu_count())


def check_world_size(world_size: int, spec: DDPSpec) -> None:
    """Refuse a world size below 1 or one that does not divide spec.batch_size."""
    if world_size < 1:
        raise ValueError(f"expected world_size >= 1, found {world_size}")
    if spec.batch_size % world_size:
        raise ValueError(
            f"expected batch_size divisible by world_size, found batch_size={spec.batch_size} "
            f"and world_size={world_size}"
        )


def torchrun_command(
    world_size: int, spec: DDPSpec, spec_file: Path = Path(SPEC_FILE)
) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=W -m <worker> --spec F`.

    Checks world_size against spec (check_world_size); `spec_file` is where write_spec wrote
    `spec` (launch_ddp passes a temporary file).
    """
    check_world_size(world_size, spec)
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={world_size}",
        "-m", WORKER_MODULE, "--spec", str(spec_file),
    ]  # fmt: skip


def _tail(*texts: str | bytes | None) -> str:
    joined = "".join(t.decode(errors="replace") if isinstance(t, bytes) else t or "" for t in texts)
    return joined[-TAIL_CHARS:]


def launch_ddp(
    world_size: int,
    spec: DDPSpec,
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run torchrun on this machine (loopback rendezvous); raise DDPLaunchError on failure.

    The workers read `spec` from a spec.json in a temporary folder (not in spec.out, the
    run's DVC output), removed when torchrun ends.
    """
    full_env = dict(os.environ if env is None else env)
    src = str(Path(fedcxr.__file__).resolve().parents[1])  # workers import this very code
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, full_env.get("PYTHONPATH")) if p)
    full_env.setdefault("OMP_NUM_THREADS", str(threads_per_process(world_size)))
    with tempfile.TemporaryDirectory(prefix="fedcxr-ddp-") as tmp:
        cmd = torchrun_command(world_size, spec, write_spec(spec, Path(tmp) / SPEC_FILE))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=full_env, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise DDPLaunchError(
                f"torchrun with {world_size} process(es) for {spec.out} did not finish in "
                f"{timeout_s} s; last output:\n{_tail(exc.stdout, exc.stderr)}"
            ) from None
    if proc.returncode != 0:
        raise DDPLaunchError(
            f"torchrun with {world_size} process(es) for {spec.out} exited with "
            f"{proc.returncode} (expected 0); last output:\n{_tail(proc.stdout, proc.stderr)}"
        )
    return proc


def read_metrics(out: Path) -> dict[str, Any]:
    """metrics.json of a finished run in `out`."""
    path = Path(out) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the output of a finished DDP run")
    return json.loads(path.read_text())
