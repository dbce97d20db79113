"""DVC stage `train_federated` (and `train_federated_dp`): FedAvg/FedProx over gRPC with
mutual TLS, one process per simulated site, for one (task, seed) of the study matrix."""

import shutil
import sys
from pathlib import Path

from _common import MODELS, SITES, matrix_entry
from dvclive import Live

from fedcxr.checkpoint import load_checkpoint
from fedcxr.config import Params
from fedcxr.federation.runner import CHECKPOINT, changed_training_keys, run_federation
from fedcxr.runs import CARD, RunCard, run_dir
from fedcxr.stageio import run_stage, write_json

PKI = Path("pki")  # certificates and keys: kept out of git (.gitignore) and DVC
REPORTS = Path("reports/train")
LIVE = Path("reports/live")


def _log_rounds(summary: dict, live_dir: Path) -> None:
    """Per-round curves through DVCLive (declared in the root dvc.yaml; dvcyaml=False)."""
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
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


def run_card(summary: dict, params: Params, family: str) -> RunCard:
    """Table 3 figures of a federation: per-site epoch time, bytes on the wire, epsilon."""
    rounds = summary["per_round"]
    last = rounds[-1]["sites"] if rounds else {}
    seconds = [
        s["epoch_seconds"] for r in rounds for s in r["sites"].values() if s.get("epoch_seconds")
    ]
    wire = sum(
        s["bytes_to_site"] + s["bytes_from_site"] for r in rounds for s in r["sites"].values()
    )
    return RunCard(
        config=family,
        task=params.task,
        seed=params.seed,
        arch=params.model.arch,
        dp_safe=params.dp.enabled,
        image_size=params.train.image_size,
        epochs=params.fl.rounds * params.fl.local_epochs,
        time_per_epoch_s=sum(seconds) / len(seconds) if seconds else 0.0,
        train_wall_s=summary["wall_s"],
        comm_bytes=int(wire),
        comm_kind="grpc_wire",
        world_size=len(summary["sites"]),
        n_train=int(sum(s["n_k"] for s in last.values())),
        sites=tuple(summary["sites"]),
        epsilon={k: s["epsilon"] for k, s in last.items() if s.get("epsilon") is not None},
        extra={"rounds": params.fl.rounds, "local_epochs": params.fl.local_epochs},
    )


def main(params: Params) -> None:
    params = matrix_entry(params, __doc__)
    family = "federated_dp" if "--dp" in sys.argv else "federated"
    out = run_dir(MODELS, family, params.task, params.seed)
    tag = f"{params.task}-s{params.seed}"
    report, live_dir = REPORTS / family / f"{tag}.json", LIVE / family / tag
    if family == "federated_dp" and not params.dp.enabled:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "SKIPPED").write_text("dp.enabled is false: no differentially private run\n")
        write_json(report, {"skipped": "dp.enabled is false"})
        shutil.rmtree(live_dir, ignore_errors=True)
        (live_dir / "plots" / "metrics").mkdir(parents=True)
        write_json(live_dir / "metrics.json", {})
        print(f"train_federated_dp: dp.enabled is false, nothing to train ({tag})")
        return
    params = params.model_copy(
        update={"dp": params.dp.model_copy(update={"enabled": family == "federated_dp"})}
    )
    # The output persists so that a killed run resumes from its last completed round. DVC
    # reruns a finished stage only when a parameter or the code changed: then start afresh.
    if (out / CHECKPOINT).exists():
        changed = changed_training_keys(params, out)
        finished = load_checkpoint(out / CHECKPOINT).round >= params.fl.rounds
        if changed or finished:
            why = f"params changed ({', '.join(changed)})" if changed else "previous run finished"
            print(f"{family} {tag}: {why}: starting a new federation")
            shutil.rmtree(out)
        else:
            print(f"{family} {tag}: resuming an interrupted federation")
    elif out.exists():
        shutil.rmtree(out)
    summary = run_federation(params, SITES, out, PKI, resume=True)
    card = run_card(summary, params, family)
    write_json(out / CARD, card.to_json())
    for record in summary["per_round"]:  # seconds are in the run card, not in this summary
        record.pop("wall_s")
        for site in record["sites"].values():
            site.pop("epoch_seconds", None)
    summary["wall_s"] = None  # timings live in the run card; this file stays comparable
    summary.pop("audit_last_hash")  # audit entries carry timestamps
    write_json(report, summary)
    shutil.rmtree(live_dir, ignore_errors=True)
    _log_rounds(summary, live_dir)
    print(
        f"{family} {tag}: {summary['rounds']} rounds over {len(summary['sites'])} sites, "
        f"validation AUROC {summary['final_val_auroc']}, {card.train_wall_s:.1f}s -> {out}"
    )


if __name__ == "__main__":
    run_stage("train_federated", main)
