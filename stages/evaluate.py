"""DVC stage `evaluate`: every trained model on the held-out test set, with honest statistics."""

import shutil
from pathlib import Path

from fedcxr.config import Params
from fedcxr.evaluation.evaluate import (
    evaluate_all,
    write_gradcam,
    write_roc,
)
from fedcxr.stageio import run_stage, write_json
from fedcxr.train.loop import pick_device

MODELS = Path("models")
TEST = Path("data/test")
SITES = Path("data/sites")
METRICS = Path("reports/metrics.json")
EFFICIENCY = Path("reports/efficiency.json")
ROC = Path("reports/plots/roc")  # <task>/<config>.csv
FIGURES = Path("reports/figures")  # gradcam_<task>.png


def main(params: Params) -> None:
    device = pick_device()
    result = evaluate_all(
        MODELS,
        TEST,
        SITES,
        batch_size=params.train.batch_size,
        num_workers=params.train.num_workers,
        seed=params.seed,
        n_boot=params.evaluate.n_boot,
        threshold_rule=params.evaluate.threshold_rule,
        device=device,
    )
    for folder in (ROC, FIGURES):  # no curve or panel left over from a configuration now gone
        shutil.rmtree(folder, ignore_errors=True)
    write_json(METRICS, result.metrics)
    write_json(EFFICIENCY, result.efficiency)
    write_roc(result.roc, ROC)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for task, plan in sorted(result.gradcam.items()):
        write_gradcam(plan, TEST, FIGURES / f"gradcam_{task}.png", device)
    for config, per_task in sorted(result.metrics.items()):
        if config == "comparisons":
            continue
        for task, m in sorted(per_task.items()):
            lo, hi = m["auroc_macro_lo"], m["auroc_macro_hi"]
            ci = "n/a" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"
            print(
                f"evaluate: {config}/{task}: AUROC {m['auroc_macro']:.3f} (95% CI {ci}), "
                f"{m['n_seeds']} seed(s)"
            )
    print(f"evaluate: -> {METRICS}, {EFFICIENCY}, {ROC}, {FIGURES}")


if __name__ == "__main__":
    run_stage("evaluate", main)
