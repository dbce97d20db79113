"""DVC stage `train_federated` (and `train_federated_dp`): FedAvg/FedProx over gRPC with
mutual TLS, one process per simulated site, for one (task, seed) of the study matrix.

The run folder persists, so a killed run resumes from its last completed round. A previous run
that cannot be continued (params changed, or it finished) is never deleted when it holds a
checkpoint or an audit log found nowhere else: it is moved to runs-archive/ (see
fedcxr.runs.set_aside) and the stage prints where. Params are checked before anything is moved.
"""

import shutil
from pathlib import Path
from typing import Annotated

import typer
from _common import Out, Seed, Sites, Task, matrix_entry
from dvclive import Live

from fedcxr.config import Params
from fedcxr.convergence import CurvePoint
from fedcxr.federation.records import RunResult, RunSummary
from fedcxr.federation.runner import CHECKPOINT, run_federation, why_not_resumable
from fedcxr.federation.summary import AUDIT
from fedcxr.models import build_model, num_classes_for
from fedcxr.runs import ARCHIVE, CARD, RunCard, in_dvc_cache, set_aside
from fedcxr.sitedata import find_sites
from fedcxr.stageio import stage_cli, write_json
from fedcxr.train.loop import pick_device
from fedcxr.train.validate import RoundCurve, Validator

CURVE = "curve.json"  # round -> validation AUROC of that round's global model


def _log_rounds(summary: RunSummary, live_dir: Path) -> None:
    """Per-round curves through DVCLive (declared in the root dvc.yaml; dvcyaml=False)."""
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for record in summary.rounds:
            # None when undefined (e.g. no site's validation split holds a positive): no point.
            for key, value in (("val_auroc", record.val_auroc), ("train_loss", record.train_loss)):
                if value is not None:
                    live.log_metric(key, value)
            for site, o in record.sites.items():
                values = {
                    "val_auroc": o.val_auroc,
                    "train_loss": o.train_loss,
                    "bytes_to_site": o.bytes_to_site,
                    "bytes_from_site": o.bytes_from_site,
                    "epsilon": o.epsilon,
                }
                for key, value in values.items():
                    if value is not None:
                        live.log_metric(f"{site}/{key}", value)
            live.next_step()


def run_card(
    result: RunResult, params: Params, family: str, curve: tuple[CurvePoint, ...] = ()
) -> RunCard:
    """Table 3 figures of a federation: per-site epoch time, bytes on the wire, epsilon."""
    summary, seconds = result.summary, result.timings.epoch_seconds()
    last = summary.rounds[-1].sites if summary.rounds else {}
    return RunCard(
        config=family,
        task=params.task,
        seed=params.seed,
        arch=params.model.arch,
        dp_safe=params.dp.enabled,
        image_size=params.train.image_size,
        epochs=params.fl.rounds * params.fl.local_epochs,
        time_per_epoch_s=sum(seconds) / len(seconds) if seconds else 0.0,
        train_wall_s=result.timings.wall_s,
        comm_bytes=summary.wire_bytes(),
        comm_kind="grpc_wire",
        world_size=len(summary.sites),
        n_train=sum(o.n_k for o in last.values()),
        sites=summary.sites,
        epsilon={k: o.epsilon for k, o in last.items() if o.epsilon is not None},
        extra={
            "rounds": params.fl.rounds,
            "local_epochs": params.fl.local_epochs,
            # which accountant computed `epsilon` (prv and rdp differ twofold at one setting)
            **({"dp_accountant": params.dp.accountant} if params.dp.enabled else {}),
        },
        curve=curve,
    )


def round_curve(params: Params, sites: Path, out: Path) -> RoundCurve:
    """Each round's global model validated on every site's validation split (the curve)."""
    device = pick_device()
    folders = [sites / name for name in find_sites(sites)]
    validator = Validator(
        folders, params.task, params.train.image_size, params.train.batch_size, device
    )
    model = build_model(
        params.model.arch, num_classes_for(params.task), False, dp_safe=params.dp.enabled
    ).to(device)
    return RoundCurve(validator, model, out / CURVE)


def clear_run(out: Path, family: str, tag: str, why: str) -> None:
    """Make room for a new run in `out`, moving a previous run's evidence aside; say where."""
    where = set_aside(
        out, ARCHIVE / family, tag, evidence=(CHECKPOINT, AUDIT), elsewhere=in_dvc_cache()
    )
    if where is not None:
        print(
            f"{family} {tag}: {why}: the previous run (checkpoint, audit log) was moved to "
            f"{where}; it stays there until you remove it"
        )
    else:
        print(f"{family} {tag}: {why}: previous outputs removed (nothing that DVC cannot restore)")


def main(
    params: Params,
    task: Task,
    seed: Seed,
    sites: Sites,
    out: Out,
    report: Annotated[
        Path, typer.Option(help="The run's summary (JSON, no seconds: comparable between runs).")
    ],
    live: Annotated[Path, typer.Option(help="DVCLive folder for the per-round curves.")],
    pki: Annotated[
        Path, typer.Option(help="Certificates and keys (created if missing; kept out of git).")
    ],
    dp: Annotated[bool, typer.Option("--dp", help="The differentially private run.")] = False,
) -> None:
    """One federation of the study matrix: an aggregator and one site process per site."""
    params = matrix_entry(params, task, seed)
    family = "federated_dp" if dp else "federated"
    tag = f"{params.task}-s{params.seed}"
    if dp and not params.dp.enabled:
        if out.exists():
            clear_run(out, family, tag, "dp.enabled is false")
        out.mkdir(parents=True)
        (out / "SKIPPED").write_text("dp.enabled is false: no differentially private run\n")
        write_json(report, {"skipped": "dp.enabled is false"})
        shutil.rmtree(live, ignore_errors=True)
        (live / "plots" / "metrics").mkdir(parents=True)
        write_json(live / "metrics.json", {})
        print(f"train_federated_dp: dp.enabled is false, nothing to train ({tag})")
        return
    params = params.model_copy(update={"dp": params.dp.model_copy(update={"enabled": dp})})
    find_sites(sites)  # no data: fail before touching the outputs
    # The output persists so that a killed run resumes from its last completed round. DVC
    # reruns a finished stage only when a parameter or the code changed: then start afresh.
    why = why_not_resumable(params, out)
    if why is not None:
        clear_run(out, family, tag, why)
        print(f"{family} {tag}: starting a new federation")
    elif (out / CHECKPOINT).exists():
        print(f"{family} {tag}: resuming an interrupted federation")
    curve = round_curve(params, sites, out)
    result = run_federation(params, sites, out, pki, resume=True, on_round=curve)
    card = run_card(result, params, family, curve.points(params.fl.local_epochs))
    write_json(out / CARD, card.to_json())
    write_json(report, result.summary.to_json())  # no seconds: comparable between runs
    shutil.rmtree(live, ignore_errors=True)
    _log_rounds(result.summary, live)
    print(
        f"{family} {tag}: {len(result.summary.rounds)} rounds over {len(result.summary.sites)} "
        f"sites, validation AUROC {result.summary.final_val_auroc}, {card.train_wall_s:.1f}s "
        f"-> {out}"
    )


if __name__ == "__main__":
    stage_cli("train_federated", main)
