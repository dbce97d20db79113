"""DVC stage `train_local`: each site trains alone on its own data (what a hospital gets
without joining the federation), with the pooled baselines' budget (train.epochs)."""

import shutil

from _common import Out, Seed, Sites, Task, matrix_entry, pooled_spec

from fedcxr.config import Params
from fedcxr.sitedata import find_sites
from fedcxr.stageio import stage_cli
from fedcxr.train.pooled import train_pooled_many


def main(params: Params, task: Task, seed: Seed, sites: Sites, out: Out) -> None:
    """Train one model per site on that site's data alone (OUT/<site>/), sites side by side
    (one process per core)."""
    params = matrix_entry(params, task, seed)
    shutil.rmtree(out, ignore_errors=True)
    names = find_sites(sites)
    jobs = [(pooled_spec(params, sites, out / s, [sites / s]), f"local_{s}") for s in names]
    for site, card in zip(names, train_pooled_many(jobs), strict=True):
        print(
            f"train_local: {site} {card.task} seed {card.seed}: {card.n_train} images, "
            f"{card.time_per_epoch_s:.1f}s/epoch -> {out / site}"
        )


if __name__ == "__main__":
    stage_cli("train_local", main)
