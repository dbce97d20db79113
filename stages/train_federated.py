"""DVC stage `train_federated`: FedAvg/FedProx over gRPC with one process per simulated site."""

import shutil
from pathlib import Path

from dvclive import Live

from fedcxr.checkpoint import load_checkpoint
from fedcxr.config import Params
from fedcxr.federation.runner import CHECKPOINT, changed_training_keys, run_federation
from fedcxr.stageio import run_stage, write_json

SITES = Path("data/sites")
OUT = Path("models/federated")  # persist: a killed run resumes from its last round
PKI = Path("pki")  # certificates and keys: kept out of git (.gitignore) and DVC
REPORT = Path("reports/federated.json")
RUN = Path("reports/federated_run.json")  # what varies run to run: times, audit head
LIVE = Path("reports/live/federated")


def _log_rounds(summary: dict) -> None:
    """Per-round curves through DVCLive (declared in the root dvc.yaml; dvcyaml=False)."""
    with Live(str(LIVE), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for record in summary["per_round"]:
            live.log_metric("val_auroc", record["val_auroc"])
            live.log_metric("train_loss", record["train_loss"])
            for site, s in sorted(record["sites"].items()):
                for key in (
                    "val_auroc",
                    "train_loss",
                    "bytes_to_site",
                    "bytes_from_site",
                    "epsilon",
                ):
                    if s.get(key) is not None:
                        live.log_metric(f"{site}/{key}", s[key])
            live.next_step()


def main(params: Params) -> None:
    # The output persists so that a killed run resumes from its last completed round. DVC
    # reruns a finished stage only when a parameter or the code changed: then start afresh.
    if (OUT / CHECKPOINT).exists():
        changed = changed_training_keys(params, OUT)
        finished = load_checkpoint(OUT / CHECKPOINT).round >= params.fl.rounds
        if changed or finished:
            why = f"params changed ({', '.join(changed)})" if changed else "previous run finished"
            print(f"train_federated: {why}: starting a new federation")
            shutil.rmtree(OUT)
        else:
            print("train_federated: resuming an interrupted federation")
    summary = run_federation(params, SITES, OUT, PKI, resume=True)
    run = {
        "wall_s": summary.pop("wall_s"),
        "round_wall_s": [r.pop("wall_s") for r in summary["per_round"]],
        "audit_last_hash": summary.pop("audit_last_hash"),  # entries carry timestamps
    }
    write_json(REPORT, summary)
    write_json(RUN, run)
    _log_rounds(summary)
    print(
        f"train_federated: {summary['rounds']} rounds over {len(summary['sites'])} sites, "
        f"validation AUROC {summary['final_val_auroc']}, {run['wall_s']:.1f}s -> {OUT}"
    )


if __name__ == "__main__":
    run_stage("train_federated", main)
