"""DVC stage `train_single_node`: the union of the five sites' training data, one process."""

import shutil

from _common import Out, Seed, Sites, Task, matrix_entry, pooled_spec

from fedcxr.config import Params
from fedcxr.stageio import stage_cli
from fedcxr.train.pooled import train_pooled


def main(params: Params, task: Task, seed: Seed, sites: Sites, out: Out) -> None:
    """Train one model on every site's training data pooled, in one process."""
    params = matrix_entry(params, task, seed)
    shutil.rmtree(out, ignore_errors=True)
    card = train_pooled(pooled_spec(params, sites, out), "single_node")
    print(
        f"train_single_node: {card.task} seed {card.seed}: {card.epochs} epochs on "
        f"{card.n_train} images, {card.time_per_epoch_s:.1f}s/epoch -> {out}"
    )


if __name__ == "__main__":
    stage_cli("train_single_node", main)
