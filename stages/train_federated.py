"""DVC stage `train_federated` (and `train_federated_dp`): FedAvg/FedProx over gRPC with
mutual TLS, one process per simulated site, for one (task, seed) of the study matrix.

The run folder persists, so a killed run resumes from its last completed round. A previous run
that cannot be continued (params changed, or it finished) is never deleted when it holds a
checkpoint or an audit log found nowhere else: it is moved to runs-archive/ (see
fedcxr.runs.set_aside) and the stage prints where. Params are checked before anything is moved.
"""

import hashlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from _common import MODELS, SITES, matrix_entry
from dvclive import Live

from fedcxr.checkpoint import load_checkpoint
from fedcxr.config import Params
from fedcxr.federation.runner import (
    CHECKPOINT,
    PARAMS,
    changed_training_keys,
    run_federation,
)
from fedcxr.federation.summary import AUDIT
from fedcxr.runs import ARCHIVE, CARD, RunCard, run_dir, set_aside
from fedcxr.sitedata import find_sites
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


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def in_dvc_cache() -> Callable[[Path], bool]:
    """Whether a file's content is an object of this repository's DVC cache (by MD5), so that
    `dvc checkout` can restore it. Outside a DVC repository nothing is."""
    try:
        from dvc.repo import Repo

        cache = Repo(".").cache.local
    except Exception:  # not a DVC repository, or DVC unusable: keep everything
        return lambda path: False
    return lambda path: Path(cache.oid_to_path(_md5(path))).is_file()


def previous_run(params: Params, out: Path) -> str | None:
    """Why the run in `out` cannot be continued; None when there is none or it can resume."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / PARAMS).is_file():
        return f"{out} holds no federation run ({PARAMS} missing)"
    changed = changed_training_keys(params, out)
    if changed:
        return f"params changed ({', '.join(changed)})"
    if (out / CHECKPOINT).exists() and load_checkpoint(out / CHECKPOINT).round >= params.fl.rounds:
        return "previous run finished"
    return None


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


def main(params: Params) -> None:
    params = matrix_entry(params, __doc__)
    family = "federated_dp" if "--dp" in sys.argv else "federated"
    out = run_dir(MODELS, family, params.task, params.seed)
    tag = f"{params.task}-s{params.seed}"
    report, live_dir = REPORTS / family / f"{tag}.json", LIVE / family / tag
    if family == "federated_dp" and not params.dp.enabled:
        if out.exists():
            clear_run(out, family, tag, "dp.enabled is false")
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
    find_sites(SITES)  # no data: fail before touching the outputs
    # The output persists so that a killed run resumes from its last completed round. DVC
    # reruns a finished stage only when a parameter or the code changed: then start afresh.
    why = previous_run(params, out)
    if why is not None:
        clear_run(out, family, tag, why)
        print(f"{family} {tag}: starting a new federation")
    elif (out / CHECKPOINT).exists():
        print(f"{family} {tag}: resuming an interrupted federation")
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
