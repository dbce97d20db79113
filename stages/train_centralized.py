"""DVC stage `train_centralized`: the pooled data trained with torch.distributed DDP over
train.ddp_world_size processes (auto: one per CUDA GPU, or 2 with gloo on CPU), via torchrun."""

import json
import shutil

from _common import MODELS, matrix_entry, pooled_spec

from fedcxr.config import ConfigError, Params
from fedcxr.runs import CARD, run_dir
from fedcxr.stageio import run_stage, write_json
from fedcxr.train.ddp import METRICS, TIMINGS, launch_ddp, machine_world_size, torchrun_command
from fedcxr.train.pooled import spec_card

PARAMS = "params.yaml"


def main(params: Params) -> None:
    params = matrix_entry(params, __doc__)
    try:  # refused before anything is removed
        world = machine_world_size(params.train.ddp_world_size)
    except ConfigError as exc:
        raise ConfigError(f"invalid configuration in {PARAMS}: {exc}") from None
    out = run_dir(MODELS, "centralized", params.task, params.seed)
    spec = pooled_spec(params, out)
    torchrun_command(world, spec)  # the same check launch_ddp makes (batch splits evenly)
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
    )
    write_json(out / CARD, card.to_json())
    print(
        f"train_centralized: {card.task} seed {card.seed}: DDP x{world}, "
        f"{card.time_per_epoch_s:.1f}s/epoch, all-reduce {card.comm_bytes / 1e6:.1f} MB -> {out}"
    )


if __name__ == "__main__":
    run_stage("train_centralized", main, PARAMS)
