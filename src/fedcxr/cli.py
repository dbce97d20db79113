"""The `fedcxr` command line: planning and checking tools around the DVC pipeline."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import ConfigError, Params, load_params
from fedcxr.stageio import write_json

app = typer.Typer(
    help="fedcxr: federated chest X-ray training as a DVC pipeline.\n\n"
    "`dvc repro` runs the pipeline (see dvc.yaml); these commands plan and check pieces of it.",
    no_args_is_help=True,
    add_completion=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", help="params.yaml to take defaults from (if it exists).")
]


def _params(path: Path) -> Params:
    try:
        return load_params(path) if path.is_file() else Params()
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--params") from None


def _metadata(path: Path):
    from fedcxr.metadata import MetadataError, read_metadata

    try:
        return read_metadata(path)
    except (MetadataError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("split-plan")
def split_plan(
    metadata_csv: Annotated[Path, typer.Argument(help="NIH Data_Entry_2017*.csv(.gz).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write PLAN.json.")] = Path(
        "PLAN.json"
    ),
    strategy: Annotated[
        str | None, typer.Option(help="demographic | iid | dirichlet (default: params.yaml).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: params.yaml).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Plan the patient-disjoint test/site split from a metadata CSV alone (no pixels).

    Uses the same code as the `partition` stage, so the plan matches what `dvc repro` builds
    from the same rows. PLAN.json holds every image's set and split, and the report figures.
    """
    from fedcxr.partition import (
        PartitionError,
        check_disjoint,
        plan_split,
        prevalence_table,
        split_report,
    )

    p = _params(params)
    cfg = p.partition.model_copy(update={"strategy": strategy} if strategy else {})
    seed = p.seed if seed is None else seed
    start = time.perf_counter()
    meta, _info = _metadata(metadata_csv)
    try:
        plan = plan_split(meta, cfg, seed)
        report = split_report(meta, plan, cfg, seed)
        check_disjoint(report)
    except PartitionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    set_of = plan.set_of()
    write_json(
        out,
        {
            "metadata": str(metadata_csv),
            "report": report,
            "assignment": dict(zip(meta["image_index"], set_of.tolist(), strict=True)),
            "validation": sorted(meta.loc[plan.split == "val", "image_index"]),
        },
    )
    typer.echo(prevalence_table(report))
    typer.echo(
        f"\n{report['total_images']} images of {report['total_patients']} patients; "
        f"patients shared between any two sets: {report['patient_overlap_total']}; "
        f"exact sizes: {report['exact_sizes']}; {time.perf_counter() - start:.1f}s -> {out}"
    )


@app.command("deid")
def deid_check(
    metadata_csv: Annotated[Path, typer.Argument(help="NIH Data_Entry_2017*.csv(.gz).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON report.")] = Path(
        "deid-report.json"
    ),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Run the de-identification checks on a metadata CSV alone (no images, no PNG chunks).

    Pseudonyms in this report use a throw-away key, so they cannot be linked to anything.
    """
    from fedcxr.deid import DeidError, Secret, deidentify

    cfg = _params(params).deid.model_copy(update={"on_violation": "scrub"})
    meta, _info = _metadata(metadata_csv)
    key = Secret(secrets.token_bytes(32), "throw-away key (metadata-only check)", False)
    try:
        _clean, report = deidentify(meta, cfg, key)
    except DeidError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    report["on_violation"] = "report only (metadata-only check)"
    write_json(out, report)
    checks = report["checks"]
    over = checks["ages"]["over_limit"]
    typer.echo(f"{report['images']} rows checked in {metadata_csv}")
    typer.echo(f"  columns off the allow-list: {len(checks['columns']['violations'])}")
    typer.echo(f"  ages over {cfg.max_age}: {over['count']} image(s), reported as 90")
    typer.echo(f"  impossible ages: {checks['ages']['impossible']['count']}")
    typer.echo(f"  non-NIH file names: {checks['file_names']['violations']['count']}")
    typer.echo(f"  patients pseudonymized: {checks['patient_ids']['patients']}")
    typer.echo(f"report -> {out}")


@app.command("check-params")
def check_params(
    path: Annotated[Path, typer.Argument(help="The params file to validate.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Validate params.yaml: unknown keys and wrong types are reported by name."""
    try:
        load_params(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}: ok")


if __name__ == "__main__":  # pragma: no cover
    app()
