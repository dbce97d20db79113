"""Pooled training in one process: the single-node baseline and each site trained alone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedcxr.convergence import CurvePoint
from fedcxr.parallel import n_workers, pmap
from fedcxr.runs import RunCard, write_run
from fedcxr.train.ddp import make_pooled_setup, make_rank_loader, set_loader_epoch
from fedcxr.train.ddpspec import DDPSpec
from fedcxr.train.loop import (
    pick_device,
    plain_state_dict,
    scheduled_lr,
    set_lr,
    threads_per_process,
    train_epoch,
)
from fedcxr.train.validate import spec_validator


def spec_card(
    spec: DDPSpec,
    config: str,
    *,
    epoch_seconds: list[float],
    train_wall_s: float,
    comm_bytes: int,
    comm_kind: str,
    world_size: int,
    n_train: int,
    curve: tuple[CurvePoint, ...] = (),
) -> RunCard:
    """The run card of a pooled (one process or DDP) run of `spec`."""
    return RunCard(
        config=config,
        task=spec.task,
        seed=spec.seed,
        arch=spec.arch,
        dp_safe=spec.dp_safe,
        image_size=spec.image_size,
        epochs=spec.epochs,
        time_per_epoch_s=sum(epoch_seconds) / len(epoch_seconds),
        train_wall_s=train_wall_s,
        comm_bytes=comm_bytes,
        comm_kind=comm_kind,
        world_size=world_size,
        n_train=n_train,
        sites=tuple(Path(f).name for f in spec.data),
        curve=curve,
    )


def train_pooled(
    spec: DDPSpec, config: str, *, progress: bool = True, threads: int | None = None
) -> RunCard:
    """Train on the pooled train splits of spec.data; write model + run card to spec.out.

    Batches come from the same global-batch sampler as the DDP baseline with one rank, so
    single-node training is the W=1 case of centralized training, step for step.
    """
    start = time.perf_counter()
    device = pick_device(threads)
    dataset, setup = make_pooled_setup(spec, device)
    loader = make_rank_loader(dataset, spec, 0, 1)
    validate = spec_validator(spec, device)
    seconds = []
    curve: list[CurvePoint] = []
    for _ in range(spec.epochs):
        set_loader_epoch(loader, setup.epochs_done)
        lr = scheduled_lr(spec.lr, setup.epochs_done, spec.epochs, spec.lr_schedule)
        set_lr(setup.optimizer, lr)
        stats = train_epoch(setup, loader, progress=progress)
        seconds.append(stats.seconds)
        val = ""
        if validate is not None:
            curve.append(CurvePoint(setup.epochs_done, validate(setup.model)))
            val = f" val AUROC {curve[-1].val_auroc}"
        print(
            f"[{config}] epoch {setup.epochs_done}/{spec.epochs} loss {stats.loss:.4f}{val} "
            f"({stats.seconds:.1f}s)",
            flush=True,
        )
    card = spec_card(
        spec,
        config,
        epoch_seconds=seconds,
        train_wall_s=time.perf_counter() - start,
        comm_bytes=0,
        comm_kind="none",
        world_size=1,
        n_train=len(dataset),
        curve=tuple(curve),
    )
    write_run(spec.out, plain_state_dict(setup.model), card)
    return card


def _train_one(job: tuple[DDPSpec, str, int]) -> RunCard:
    spec, config, threads = job
    return train_pooled(spec, config, progress=False, threads=threads)


def train_pooled_many(
    jobs: Sequence[tuple[DDPSpec, str]], workers: int = 0, threads: int | None = None
) -> list[RunCard]:
    """train_pooled for each (spec, config), `workers` at a time (0: one per core), each with
    `threads` torch threads (default: its share of the cores). Every run seeds itself, so a
    model depends on its own thread count (CPU kernels sum in thread-dependent order), not on
    which runs share the machine; the cards come back in `jobs` order."""
    workers = min(n_workers(workers), max(1, len(jobs)))
    threads = threads if threads is not None else threads_per_process(workers)
    return list(
        pmap(
            _train_one,
            [(spec, config, threads) for spec, config in jobs],
            total=len(jobs),
            workers=workers,
            desc="runs",
            chunksize=1,
        )
    )
