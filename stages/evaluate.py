"""DVC stage `evaluate`: every trained model on the held-out test set, with honest statistics."""

import shutil
from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import Params
from fedcxr.evaluation.evaluate import (
    evaluate_all,
    write_gradcam,
    write_roc,
)
from fedcxr.stageio import stage_cli, write_json
from fedcxr.train.loop import pick_device


def main(
    params: Params,
    models: Annotated[Path, typer.Option(help="Folder of every training stage's run folders.")],
    test: Annotated[Path, typer.Option(help="The held-out test set (partition's data/test).")],
    sites: Annotated[Path, typer.Option(help="The site folders (for the sites' prevalences).")],
    metrics: Annotated[Path, typer.Option(help="Where to write the metrics (JSON).")],
    efficiency: Annotated[Path, typer.Option(help="Where to write the costs (JSON).")],
    roc: Annotated[Path, typer.Option(help="Folder for the ROC curves: <task>/<config>.csv.")],
    figures: Annotated[Path, typer.Option(help="Folder for the Grad-CAM panels.")],
    curves: Annotated[Path, typer.Option(help="Where to write every run's learning curve (JSON).")],
) -> None:
    """Every trained model on the held-out test set: AUROC with CIs, comparisons, costs."""
    device = pick_device()
    result = evaluate_all(
        models,
        test,
        sites,
        batch_size=params.train.batch_size,
        num_workers=params.train.num_workers,
        seed=params.seed,
        n_boot=params.evaluate.n_boot,
        threshold_rule=params.evaluate.threshold_rule,
        device=device,
        plateau_window=params.study.plateau_window,
        plateau_tol=params.study.plateau_tol,
    )
    for folder in (roc, figures):  # no curve or panel left over from a configuration now gone
        shutil.rmtree(folder, ignore_errors=True)
    write_json(metrics, result.metrics)
    write_json(efficiency, result.efficiency)
    write_json(curves, result.curves)
    write_roc(result.roc, roc)
    figures.mkdir(parents=True, exist_ok=True)
    for task, plan in sorted(result.gradcam.items()):
        write_gradcam(plan, test, figures / f"gradcam_{task}.png", device)
    for config, per_task in sorted(result.metrics.items()):
        if config == "comparisons":
            continue
        for task, m in sorted(per_task.items()):
            lo, hi = m["auroc_macro_lo"], m["auroc_macro_hi"]
            ci = "n/a" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"
            print(
                f"evaluate: {config}/{task}: AUROC {m['auroc_macro']:.3f} (95% CI {ci}), "
                f"{m['n_seeds']} seed(s), {m['training']['why']}"
            )
    print(f"evaluate: -> {metrics}, {efficiency}, {roc}, {figures}")


if __name__ == "__main__":
    stage_cli("evaluate", main)
