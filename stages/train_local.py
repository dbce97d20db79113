"""DVC stage `train_local`: each site trains alone on its own data (what a hospital gets
without joining the federation), with the pooled baselines' budget (train.epochs)."""

import shutil

from _common import MODELS, SITES, matrix_entry, pooled_spec

from fedcxr.config import Params
from fedcxr.runs import run_dir
from fedcxr.sitedata import find_sites
from fedcxr.stageio import run_stage
from fedcxr.train.pooled import train_pooled


def main(params: Params) -> None:
    params = matrix_entry(params, __doc__)
    base = run_dir(MODELS, "local", params.task, params.seed)
    shutil.rmtree(base, ignore_errors=True)
    for site in find_sites(SITES):
        out = base / site
        card = train_pooled(pooled_spec(params, out, [SITES / site]), f"local_{site}")
        print(
            f"train_local: {site} {card.task} seed {card.seed}: {card.n_train} images, "
            f"{card.time_per_epoch_s:.1f}s/epoch -> {out}"
        )


if __name__ == "__main__":
    run_stage("train_local", main)
