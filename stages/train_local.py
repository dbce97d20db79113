"""DVC stage `train_local`: each site trains alone on its own data (what a hospital gets
without joining the federation), with the pooled baselines' budget (train.epochs)."""

import shutil

from _common import Out, Seed, Sites, Task, matrix_entry, pooled_spec

from fedcxr.config import Params
from fedcxr.sitedata import find_sites
from fedcxr.stageio import stage_cli
from fedcxr.train.pooled import train_pooled


def main(params: Params, task: Task, seed: Seed, sites: Sites, out: Out) -> None:
    """Train one model per site on that site's data alone (OUT/<site>/)."""
    params = matrix_entry(params, task, seed)
    shutil.rmtree(out, ignore_errors=True)
    for site in find_sites(sites):
        card = train_pooled(pooled_spec(params, sites, out / site, [sites / site]), f"local_{site}")
        print(
            f"train_local: {site} {card.task} seed {card.seed}: {card.n_train} images, "
            f"{card.time_per_epoch_s:.1f}s/epoch -> {out / site}"
        )


if __name__ == "__main__":
    stage_cli("train_local", main)
