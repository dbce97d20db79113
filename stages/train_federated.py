"""DVC stage `train_federated`: FedAvg/FedProx over gRPC with one process per simulated site."""

from pathlib import Path

from fedcxr.config import Params
from fedcxr.federation.runner import run_federation
from fedcxr.stageio import run_stage, write_json

SITES = Path("data/sites")
OUT = Path("models/federated")
PKI = Path("pki")  # certificates and keys: kept out of git (.gitignore) and DVC
REPORT = Path("reports/federated.json")


def main(params: Params) -> None:
    summary = run_federation(params, SITES, OUT, PKI, resume=True)
    write_json(REPORT, summary)
    last = summary["per_round"][-1] if summary["per_round"] else {}
    print(
        f"train_federated: {summary['rounds']} rounds over {len(summary['sites'])} sites, "
        f"val AUROC {last.get('val_auroc')}, {summary['wall_s']:.1f}s -> {OUT}, {REPORT}"
    )


if __name__ == "__main__":
    run_stage("train_federated", main)
