"""The `fedcxr` command line: planning and checking tools around the DVC pipeline."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from fedcxr.config import ConfigError, Params, load_params, parse_params, resolve_world_size
from fedcxr.plancost_cli import plan_cost
from fedcxr.review import review
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
    cfg = p.partition
    if strategy:  # checked like params.yaml (the registry's names), not copied in unchecked
        try:
            cfg = parse_params({"partition": {**cfg.model_dump(), "strategy": strategy}}).partition
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--strategy") from None
    seed = p.seed if seed is None else seed
    start = time.perf_counter()
    meta, _info = _metadata(metadata_csv)
    try:
        plan = plan_split(meta, cfg, seed)
        report = split_report(meta, plan, cfg, seed)
        check_disjoint(report)
    except PartitionError as exc:
        typer.echo(f"error: {exc} (data: {metadata_csv})", err=True)
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
    typer.echo(plan.sizes.describe())


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


app.command("plan-cost")(plan_cost)
app.command("review")(review)  # the Markdown scripts/review.sh writes in CI


@app.command("check-params")
def check_params(
    path: Annotated[Path, typer.Argument(help="The params file to validate.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Validate params.yaml as every stage does, then against this machine.

    Unknown keys, wrong types, names no registry holds (model.arch, fl.strategy,
    partition.strategy) and YAML syntax errors are reported by key, or by line and column.
    Then: with data.source nih, the folder data.nih_dir must exist (DVC tracks it), and
    train.ddp_world_size may not exceed this machine's CUDA GPUs.
    """
    try:
        params = load_params(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    # DVC resolves data.nih_dir (a dependency of ingest and resize) beside dvc.yaml/params.yaml
    # and stops with a bare "[Errno 2]" when it is missing: say so first.
    folder = Path(params.data.nih_dir)
    folder = folder if folder.is_absolute() else path.parent / folder
    if params.data.source == "nih" and not folder.is_dir():
        typer.echo(
            f"invalid configuration in {path}:\n  - 'data.nih_dir': expected the folder of the "
            f"NIH download (DVC tracks it as the input of ingest and resize), found no folder "
            f"at {folder}",
            err=True,
        )
        raise typer.Exit(2)
    world = params.train.ddp_world_size
    if world == "auto" or world > 1:
        import torch  # only here: the GPU count is this machine's, not the params'

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        try:
            world = resolve_world_size(world, gpus)
        except ConfigError as exc:
            typer.echo(f"invalid configuration in {path}:\n  - {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{path}: ok (centralized DDP baseline: {world} process(es) on this machine)")


def _group(name: str, summary: str) -> typer.Typer:
    """A command group `fedcxr <name> ...`, registered on `app`; bare, it prints its help."""
    group = typer.Typer(help=summary, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


pki_app = _group(
    "pki",
    "The federation's PKI: a CA, the aggregator's server certificate, one client certificate "
    "per site (ECDSA P-256, PEM files for grpc's mutual TLS). Keep the folder out of git and DVC.",
)
audit_app = _group("audit", "The federation's append-only, hash-chained audit log (JSONL).")

PkiDirOption = Annotated[Path, typer.Option("--dir", help="PKI folder holding ca.pem and ca.key.")]


def _pki_fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@pki_app.command("init")
def pki_init(
    folder: Annotated[Path, typer.Argument(help="Folder to create ca.pem and ca.key in.")],
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "fedcxr federation CA",
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 3650,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (invalidates its certs).")
    ] = False,
) -> None:
    """Create the federation CA: ca.pem (certificate) and ca.key (private key, mode 0600)."""
    from fedcxr.federation.certs import fingerprint
    from fedcxr.federation.pki import PkiError, init_ca

    try:
        files = init_ca(folder, name, days, force=force)
    except PkiError as exc:
        raise _pki_fail(exc) from None
    typer.echo(f"CA {name!r} -> {files.cert} (key {files.key}, mode 0600)")
    typer.echo(f"fingerprint: {fingerprint(files.cert.read_bytes())}")


@pki_app.command("issue")
def pki_issue(
    common_name: Annotated[
        str, typer.Argument(help="Site name (like site-a) or the server's name (aggregator).")
    ],
    folder: PkiDirOption = Path("pki"),
    role: Annotated[
        Literal["site", "server"],
        typer.Option(help="site: client certificate; server: the aggregator's certificate."),
    ] = "site",
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Extra DNS name or IP the server answers on (repeatable); "
            "localhost, 127.0.0.1 and ::1 are always included.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 825,
    out: Annotated[
        Path | None, typer.Option(help="Where to write <name>.pem/.key (default: --dir).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Issue a certificate and key signed by the CA in --dir: <name>.pem and <name>.key (0600)."""
    from fedcxr.federation.certs import describe
    from fedcxr.federation.pki import PkiError, issue

    try:
        files = issue(folder, common_name, role, host or (), days, out=out, force=force)
    except PkiError as exc:
        raise _pki_fail(exc) from None
    info = describe(files.cert.read_bytes())
    typer.echo(f"{role} certificate {common_name!r} -> {files.cert} (key {files.key}, mode 0600)")
    typer.echo(f"fingerprint: {info.fingerprint}")
    typer.echo(f"valid until: {info.not_after:%Y-%m-%d %H:%M} UTC")
    typer.echo(f"names: {', '.join([*info.dns_names, *info.ip_addresses])}")


@pki_app.command("show")
def pki_show(
    cert: Annotated[Path, typer.Argument(help="A PEM certificate (ca.pem, site-a.pem, ...).")],
    ca: Annotated[
        Path | None,
        typer.Option(help="CA to check the certificate against (default: ca.pem beside it)."),
    ] = None,
) -> None:
    """Print a certificate's common name, fingerprint, validity and issuer; check its chain."""
    import datetime as dt

    from fedcxr.federation.certs import describe, verify_chain
    from fedcxr.federation.pki import CA_CERT, PkiError

    try:
        pem = cert.read_bytes()
        info = describe(pem)
    except (OSError, PkiError) as exc:
        raise _pki_fail(f"{cert}: {exc}" if isinstance(exc, PkiError) else exc) from None
    now = dt.datetime.now(dt.UTC)
    left = (info.not_after - now).days
    state = f"expires in {left} days" if info.not_after > now else "EXPIRED"
    kind = "CA" if info.is_ca else ", ".join(info.usages) or "no extended key usage"
    typer.echo(f"common name: {info.common_name}")
    typer.echo(f"kind:        {kind}")
    typer.echo(f"issuer:      {info.issuer}")
    typer.echo(f"fingerprint: {info.fingerprint}")
    typer.echo(f"valid from:  {info.not_before:%Y-%m-%d %H:%M} UTC")
    typer.echo(f"valid until: {info.not_after:%Y-%m-%d %H:%M} UTC ({state})")
    names = [f"DNS:{d}" for d in info.dns_names] + [f"IP:{i}" for i in info.ip_addresses]
    if names:
        typer.echo(f"names:       {', '.join(names)}")
    ca_path = ca if ca is not None else cert.parent / CA_CERT
    if ca is None and (not ca_path.is_file() or ca_path.resolve() == cert.resolve()):
        return
    try:
        verify_chain(pem, ca_path.read_bytes())
    except (OSError, PkiError) as exc:
        typer.echo(f"chain:       BROKEN against {ca_path}: {exc}")
        raise typer.Exit(1) from None
    typer.echo(f"chain:       ok (signed by {ca_path}, in date)")


@audit_app.command("verify")
def audit_verify(
    log: Annotated[Path, typer.Argument(help="The audit log (JSONL) to check.")],
) -> None:
    """Check the hash chain of an audit log; exit 0 if intact, 1 at the first broken line."""
    from fedcxr.federation.audit import verify

    try:
        result = verify(log)
    except OSError as exc:
        typer.echo(f"error: cannot read audit log {log}: {exc}", err=True)
        raise typer.Exit(2) from None
    if not result.ok:
        typer.echo(f"BROKEN at line {result.first_bad_line}: {result.reason} ({log})")
        raise typer.Exit(1)
    typer.echo(f"ok: {result.entries} entries, chain intact ({log})")
    typer.echo(f"last hash: {result.last_hash}")


aggregator_app = _group(
    "aggregator",
    "The federation's aggregator (gRPC server, mutual TLS): serve the rounds to the sites.",
)
site_app = _group(
    "site", "A hospital's site worker: dials out to the aggregator and trains on local data only."
)


@aggregator_app.command("serve")
def aggregator_serve(
    sites: Annotated[
        str, typer.Option("--sites", help="Allowed site names, comma-separated (site-a,site-b).")
    ],
    pki: Annotated[
        Path, typer.Option("--pki", help="PKI folder: CA and certificates (created if missing).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output folder: audit log, checkpoint, model, history."),
    ],
    params: ParamsOption = Path("params.yaml"),
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: fl.host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on; 0 = any free (default: fl.port).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/checkpoint.safetensors.")
    ] = False,
) -> None:
    """Run the aggregator alone, for sites on other machines; write the summary to OUT.

    Issues any missing certificates in --pki (hand each site its <site>.pem, <site>.key and
    ca.pem), listens until fl.rounds rounds are done, then writes model.safetensors,
    history.json, timings.json and summary.json in --out.
    """
    from fedcxr.federation.pki import PkiError
    from fedcxr.federation.protocol import FederationError
    from fedcxr.federation.runner import serve_aggregator

    names = [s.strip() for s in sites.split(",") if s.strip()]
    if not names:
        raise typer.BadParameter("expected at least one site name", param_hint="--sites")

    def ready(bound: int) -> None:
        typer.echo(f"aggregator listening on port {bound} for sites {names}")

    try:
        result = serve_aggregator(
            _params(params), names, out, pki, resume=resume, host=host, port=port, on_ready=ready
        )
    except (FederationError, PkiError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    write_json(out / "summary.json", result.to_json())
    typer.echo(f"{len(result.summary.rounds)} rounds done -> {out} ({result.timings.wall_s:.1f}s)")


@site_app.command("run")
def site_run(
    aggregator: Annotated[str, typer.Option("--aggregator", help="The aggregator's HOST:PORT.")],
    ca: Annotated[Path, typer.Option("--ca", help="The federation CA certificate (ca.pem).")],
    cert: Annotated[Path, typer.Option("--cert", help="This site's certificate (PEM).")],
    key: Annotated[Path, typer.Option("--key", help="This site's private key (PEM).")],
    data: Annotated[
        Path, typer.Option("--data", help="This site's folder (images.npy + index.csv).")
    ],
    params: ParamsOption = Path("params.yaml"),
    n_sites: Annotated[
        int, typer.Option("--n-sites", min=1, help="Site processes sharing this machine's CPUs.")
    ] = 1,
    state: Annotated[
        Path | None,
        typer.Option("--state", help="Folder to keep the DP accountant in across restarts."),
    ] = None,
) -> None:
    """Join the federation as this site and train every round on local data until told to stop.

    The site's identity is its certificate's common name; only weights and metrics leave it.
    """
    import logging

    from fedcxr.federation.pki import PkiError
    from fedcxr.federation.site_trainer import run_site_process, tls_from_files

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = _params(params)
    try:
        tls = tls_from_files(ca, cert, key)
    except (PkiError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    records = run_site_process(aggregator, tls, data, p, n_sites=n_sites, state_dir=state)
    typer.echo(f"{data.name}: {len(records)} round(s) trained; federation finished")


if __name__ == "__main__":  # pragma: no cover
    app()
