"""Shared by the training stage scripts: the (task, seed) a matrix entry runs, its spec."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcxr.config import Params
from fedcxr.sitedata import find_sites
from fedcxr.train.ddp import DDPSpec

SITES = Path("data/sites")
MODELS = Path("models")


def matrix_entry(params: Params, description: str) -> Params:
    """params with the --task/--seed of this DVC matrix entry applied (defaults: params)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=["multilabel", "pneumonia"], default=params.task)
    parser.add_argument("--seed", type=int, default=params.train.seeds[0])
    parser.add_argument("--dp", action="store_true", help="the differentially private run")
    args = parser.parse_args()
    return params.model_copy(update={"task": args.task, "seed": args.seed})


def pooled_spec(params: Params, out: Path, folders: list[Path] | None = None) -> DDPSpec:
    """A pooled-training spec over every site's train split (train.epochs epochs)."""
    if folders is None:
        folders = [SITES / name for name in find_sites(SITES)]
    return DDPSpec(
        data=tuple(folders),
        out=out,
        task=params.task,
        arch=params.model.arch,
        epochs=params.train.epochs,
        batch_size=params.train.batch_size,
        lr=params.train.lr,
        image_size=params.train.image_size,
        seed=params.seed,
        augment=params.train.augment,
        num_workers=params.train.num_workers,
        pretrained=params.model.pretrained,
    )
