"""DVC stage `train_centralized`: the pooled data trained with torch.distributed DDP over
train.ddp_world_size processes (auto: one per CUDA GPU, or 2 with gloo on CPU), via torchrun."""

import json
import shutil

from _common import Out, Seed, Sites, Task, matrix_entry, pooled_spec

from fedcxr.config import ConfigError, Params
from fedcxr.convergence import CurvePoint
from fedcxr.runs import CARD
from fedcxr.stageio import stage_cli, write_json
from fedcxr.train.ddp import METRICS, TIMINGS, check_world_size, launch_ddp, machine_world_size
from fedcxr.train.pooled import spec_card

PARAMS = "params.yaml"


def main(params: Params, task: Task, seed: Seed, sites: Sites, out: Out) -> None:
    """Train one model on every site's training data pooled, with DDP over W processes."""
    params = matrix_entry(params, task, seed)
    try:  # refused before anything is removed
        world = machine_world_size(params.train.ddp_world_size)
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration in {PARAMS}: {exc}") from None
    spec = pooled_spec(params, sites, out)
    check_world_size(world, spec)  # the same check launch_ddp makes (batch splits evenly)
    shutil.rmtree(out, ignore_errors=True)
    launch_ddp(world, spec)
    metrics = json.loads((out / METRICS).read_text())
    timings = json.loads((out / TIMINGS).read_text())
    card = spec_card(
        spec,
        "centralized",
        epoch_seconds=timings["epoch_seconds"],
        train_wall_s=timings["seconds_total"],
        comm_bytes=int(metrics["allreduce_bytes"]),
        comm_kind="allreduce",
        world_size=world,
        n_train=int(metrics["train_examples"]),
        curve=tuple(CurvePoint.from_json(p, str(out / METRICS)) for p in metrics["curve"]),
    )
    write_json(out / CARD, card.to_json())
    print(
        f"train_centralized: {card.task} seed {card.seed}: DDP x{world}, "
        f"{card.time_per_epoch_s:.1f}s/epoch, all-reduce {card.comm_bytes / 1e6:.1f} MB -> {out}"
    )


if __name__ == "__main__":
    stage_cli("train_centralized", main, PARAMS)
