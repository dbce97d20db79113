"""The `fedcxr plan-cost` command: measure this machine, then project the full study's cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import ConfigError, Params, load_params
from fedcxr.plancost import NIH_IMAGES, NIH_TEST, Rates, Workload, format_plan, project

Opt = typer.Option


def plan_cost(
    images: Annotated[int, Opt(help="Images in the study (the full NIH set by default).")] = (
        NIH_IMAGES
    ),
    test_size: Annotated[int, Opt(help="Held-out test images.")] = NIH_TEST,
    arch: Annotated[str | None, Opt(help="Model (default: model.arch).")] = None,
    size: Annotated[int | None, Opt(help="Training size (default: train.image_size).")] = None,
    rounds: Annotated[int | None, Opt(help="Federated rounds (default: fl.rounds).")] = None,
    local_epochs: Annotated[int | None, Opt(help="Default: fl.local_epochs.")] = None,
    epochs: Annotated[int | None, Opt(help="Pooled epochs (default: train.epochs).")] = None,
    seeds: Annotated[int | None, Opt(help="Seeds (default: len(train.seeds)).")] = None,
    device: Annotated[str, Opt(help="Device to measure training on: cpu or cuda.")] = "cpu",
    train_rate: Annotated[
        float | None,
        Opt(help="Training images/s measured elsewhere (e.g. bench_train.py on the GPU)."),
    ] = None,
    params: Annotated[Path, Opt("--params", help="params.yaml for the defaults.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Project the wall time and disk of a study on this machine before starting it.

    Measures PNG decoding and resizing on every core and a few training steps of the model
    (or takes --train-rate), then scales them to the study: every configuration the pipeline
    trains, for each task and seed. The paper's setting, for example:
    `fedcxr plan-cost --arch densenet121 --size 512 --rounds 20 --local-epochs 2 --epochs 40
    --seeds 3 --device cuda`.
    """
    import torch

    from fedcxr.measure import decode_rate
    from fedcxr.measure import train_rate as measure_train

    try:
        p = load_params(params) if params.is_file() else Params()
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--params") from None
    arch = arch or p.model.arch
    size = size or p.train.image_size
    work = Workload(
        n_images=images,
        test_size=test_size,
        val_fraction=p.partition.val_fraction,
        image_size=size,
        stored_size=max(size, p.resize.size),
        rounds=rounds or p.fl.rounds,
        local_epochs=local_epochs or p.fl.local_epochs,
        epochs=epochs or p.train.epochs,
        tasks=len(p.study.tasks),
        seeds=seeds or len(p.train.seeds),
        dp=p.dp.enabled,
    )
    typer.echo(f"measuring this machine ({arch} at {size} px on {device}) ...")
    decoded = decode_rate(work.stored_size)
    if train_rate is None:
        train_rate = measure_train(arch, size, p.train.batch_size, torch.device(device))
    rates = Rates(decode_images_per_s=decoded, train_images_per_s=train_rate)
    typer.echo(format_plan(project(work, rates), work, rates))
