"""Shared by the training stage scripts: the matrix entry's options, its params, its spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from fedcxr.config import Params
from fedcxr.sitedata import find_sites
from fedcxr.train.ddpspec import DDPSpec

# The options every training stage takes from its `cmd` line in dvc.yaml.
Task = Annotated[
    Literal["multilabel", "pneumonia"], typer.Option(help="The task of this matrix entry.")
]
Seed = Annotated[int, typer.Option(help="The seed of this matrix entry.")]
Sites = Annotated[Path, typer.Option(help="Folder of the site folders (partition's data/sites).")]
Out = Annotated[Path, typer.Option(help="The run folder to write (model, run card).")]


def matrix_entry(params: Params, task: str, seed: int) -> Params:
    """params with the task and seed of this DVC matrix entry applied."""
    return params.model_copy(update={"task": task, "seed": seed})


def pooled_spec(
    params: Params, sites: Path, out: Path, folders: list[Path] | None = None
) -> DDPSpec:
    """A pooled-training spec over the train splits of `folders` (default: every site) for
    train.epochs epochs, validated after each epoch on every site's validation split."""
    every_site = [sites / name for name in find_sites(sites)]
    if folders is None:
        folders = every_site
    return DDPSpec(
        data=tuple(folders),
        out=out,
        task=params.task,
        arch=params.model.arch,
        epochs=params.train.epochs,
        batch_size=params.train.batch_size,
        lr=float(params.train.lr),
        lr_schedule=params.train.lr_schedule,
        image_size=params.train.image_size,
        seed=params.seed,
        augment=params.train.augment,
        num_workers=params.train.num_workers,
        pretrained=params.model.pretrained,
        compile=params.train.compile,
        val_data=tuple(every_site),
    )
