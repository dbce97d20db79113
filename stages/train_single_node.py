"""DVC stage `train_single_node`: the union of the five sites' training data, one process."""

import shutil

from _common import MODELS, matrix_entry, pooled_spec

from fedcxr.config import Params
from fedcxr.runs import run_dir
from fedcxr.stageio import run_stage
from fedcxr.train.pooled import train_pooled


def main(params: Params) -> None:
    params = matrix_entry(params, __doc__)
    out = run_dir(MODELS, "single_node", params.task, params.seed)
    shutil.rmtree(out, ignore_errors=True)
    card = train_pooled(pooled_spec(params, out), "single_node")
    print(
        f"train_single_node: {card.task} seed {card.seed}: {card.epochs} epochs on "
        f"{card.n_train} images, {card.time_per_epoch_s:.1f}s/epoch -> {out}"
    )


if __name__ == "__main__":
    run_stage("train_single_node", main)
