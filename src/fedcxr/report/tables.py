"""The report's tables as pure functions of the loaded metrics (no I/O, no formatting state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcxr.report import fmt
from fedcxr.report.document import Table
from fedcxr.report.inputs import Curve
from fedcxr.report.paper import PERFORMANCE, TABLE2, TABLE3

CONFIG_ORDER: tuple[str, ...] = (
    "federated",
    "federated_dp",
    "centralized",
    "single_node",
    "local_site-a",
    "local_site-b",
    "local_site-c",
    "local_site-d",
    "local_site-e",
)
CONFIG_LABELS: dict[str, str] = {
    "federated": "Federated",
    "federated_dp": "Federated + DP",
    "centralized": "Centralized (multi-node)",
    "single_node": "Single node",
}
TASK_LABELS: dict[str, str] = {
    "multilabel": "multi-label (14 findings)",
    "pneumonia": "pneumonia (binary)",
}
PERFORMANCE_METRICS: tuple[tuple[str, str], ...] = (
    ("auroc_macro", "Macro AUROC"),
    ("accuracy", "Accuracy"),
    ("f1", "F1"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)


def config_label(config: str) -> str:
    """Display name of a configuration key."""
    if config in CONFIG_LABELS:
        return CONFIG_LABELS[config]
    if config.startswith("local_"):
        return f"Site-local ({config.removeprefix('local_')})"
    return config


def task_label(task: str) -> str:
    """Display name of a task key."""
    return TASK_LABELS.get(task, task)


def ordered(configs: list[str] | set[str] | Mapping[str, Any]) -> list[str]:
    """Configurations in the report's order: known ones first, then the rest sorted."""
    names = set(configs)
    return [c for c in CONFIG_ORDER if c in names] + sorted(names - set(CONFIG_ORDER))


def configs_with(configs: Mapping[str, Mapping[str, Any]], task: str) -> list[str]:
    """Configurations that have metrics for `task`, in report order."""
    return ordered([c for c, per_task in configs.items() if task in per_task])


def test_set_size(configs: Mapping[str, Mapping[str, Any]], task: str) -> str:
    """'180 images, 56 patients' from the first configuration that records it."""
    for config in configs_with(configs, task):
        m = configs[config][task]
        if m.get("n_test_images") is not None:
            return (
                f"{fmt.count(m.get('n_test_images'))} test images, "
                f"{fmt.count(m.get('n_test_patients'))} patients"
            )
    return "test set size not recorded"


def performance_table(configs: Mapping[str, Mapping[str, Any]], task: str, tag: str) -> Table:
    """Table 1 for one task: each metric with its 95% CI beside the paper's value."""
    published = PERFORMANCE.get(task, {})
    source = "Table 1" if task == "multilabel" else "Table 2"
    headers = ["Configuration"]
    for _, title in PERFORMANCE_METRICS:
        headers += [title, f"{title} (paper)"]
    headers.append("Seeds")
    rows = []
    for config in configs_with(configs, task):
        m = configs[config][task]
        row = [config_label(config)]
        for key, _ in PERFORMANCE_METRICS:
            row += [fmt.estimate(m, key), fmt.paper(published.get(config, {}).get(key))]
        row.append(fmt.count(m.get("n_seeds")))
        rows.append(tuple(row))
    caption = (
        f"Table 1{tag} — {task_label(task)}: {test_set_size(configs, task)}; estimate "
        f"(95% CI), ± std over seeds when more than one; paper: {source}, mean ± sd"
    )
    return Table(tuple(headers), tuple(rows), caption)


def pneumonia_table(configs: Mapping[str, Mapping[str, Any]], tasks: list[str]) -> Table | None:
    """Table 2: pneumonia sensitivity and specificity with CIs, beside the paper's Table 2."""
    rows = []
    for task in tasks:
        for config in configs_with(configs, task):
            m = configs[config][task]
            sens, spec = m.get("sensitivity_pneumonia"), m.get("specificity_pneumonia")
            if fmt.number(sens) is None and fmt.number(spec) is None:
                continue
            published = TABLE2.get(config, {}) if task == "pneumonia" else {}
            rows.append(
                (
                    task_label(task),
                    config_label(config),
                    fmt.estimate(m, "sensitivity_pneumonia"),
                    fmt.paper(published.get("sensitivity_pneumonia")),
                    fmt.estimate(m, "specificity_pneumonia"),
                    fmt.paper(published.get("specificity_pneumonia")),
                )
            )
    if not rows:
        return None
    headers = (
        "Task",
        "Configuration",
        "Sensitivity",
        "Sensitivity (paper)",
        "Specificity",
        "Specificity (paper)",
    )
    caption = (
        "Table 2 — pneumonia sensitivity and specificity: estimate (95% CI); paper: "
        "Table 2 (binary pneumonia detection), mean ± sd"
    )
    return Table(headers, tuple(rows), caption)


def efficiency_table(efficiency: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Table 3: time per epoch and bytes communicated, beside the paper's Table 3."""
    rows = []
    for config in ordered(efficiency):
        for task in sorted(efficiency[config]):
            e = efficiency[config][task]
            published = TABLE3.get(config, {})
            kind = e.get("comm_kind") or fmt.MISSING
            rows.append(
                (
                    config_label(config),
                    task_label(task),
                    fmt.seconds(e.get("time_per_epoch_s")),
                    fmt.paper(published.get("time_per_epoch")),
                    fmt.count(e.get("epochs")),
                    fmt.seconds(e.get("train_wall_s")),
                    fmt.megabytes(e.get("comm_bytes")) if kind != "none" else "0",
                    fmt.paper(published.get("comm")),
                    str(kind),
                    fmt.count(e.get("world_size")),
                )
            )
    if not rows:
        return None
    headers = (
        "Configuration",
        "Task",
        "Time/epoch (s)",
        "Time/epoch (paper)",
        "Epochs",
        "Training wall time (s)",
        "Communication (MB)",
        "Communication (paper)",
        "Measured as",
        "Processes",
    )
    caption = (
        "Table 3 — training efficiency: MB = 10^6 bytes; grpc_wire = bytes on the wire "
        "between aggregator and sites, allreduce = gradient bytes exchanged by DDP; "
        "paper: Table 3 (hours per epoch on GPUs, GB)"
    )
    return Table(headers, tuple(rows), caption)


def per_label_table(configs: Mapping[str, Mapping[str, Any]], task: str) -> Table | None:
    """AUROC per finding, one column per configuration, the macro average last."""
    names = configs_with(configs, task)
    labels: list[str] = []
    for config in names:
        for label in configs[config][task].get("auroc") or {}:
            if label not in labels:
                labels.append(label)
    if not labels:
        return None
    rows = [
        tuple([label] + [fmt.num((configs[c][task].get("auroc") or {}).get(label)) for c in names])
        for label in labels
    ]
    rows.append(
        tuple(["Macro average"] + [fmt.num(configs[c][task].get("auroc_macro")) for c in names])
    )
    caption = (
        f"AUROC per finding — {task_label(task)} (— where the test set has no positive "
        f"or no negative case)"
    )
    return Table(tuple(["Finding"] + [config_label(c) for c in names]), tuple(rows), caption)


def _sets(partition: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    sets = partition.get("sets") or {}
    return [(name, sets[name]) for name in sorted(sets, key=lambda n: (n == "test", n))]


def _share(part: Any, whole: Any) -> str:
    p, w = fmt.number(part), fmt.number(whole)
    return fmt.MISSING if p is None or not w else fmt.percent(p / w)


def site_overview_table(partition: Mapping[str, Any]) -> Table | None:
    """Data card per set: size, patients, splits, age, sex and view mix."""
    sets = _sets(partition)
    if not sets:
        return None
    bands: list[str] = []
    for _, s in sets:
        for band in (s.get("age") or {}).get("bands") or {}:
            if band not in bands:
                bands.append(band)
    rows = []
    for name, s in sets:
        age = s.get("age") or {}
        images = s.get("images")
        train, val = s.get("train") or {}, s.get("val") or {}
        split = (
            f"{fmt.count(train.get('images'))} / {fmt.count(val.get('images'))}"
            if train or val
            else "held out"
        )
        band_counts = age.get("bands") or {}
        rows.append(
            (
                name,
                fmt.count(images),
                fmt.count(s.get("patients")),
                split,
                f"{fmt.num(age.get('mean'), 1)} ± {fmt.num(age.get('std'), 1)}",
                " / ".join(fmt.count(band_counts.get(b)) for b in bands) or fmt.MISSING,
                _share((s.get("sex") or {}).get("F"), images),
                _share((s.get("view") or {}).get("AP"), images),
                fmt.percent(s.get("no_finding")),
            )
        )
    headers = (
        "Set",
        "Images",
        "Patients",
        "Train / val images",
        "Age mean ± sd",
        f"Age bands {' / '.join(bands)}" if bands else "Age bands",
        "Female",
        "AP view",
        "No finding",
    )
    caption = (
        f"Site data cards — strategy {partition.get('strategy', fmt.MISSING)}, "
        f"{fmt.count(partition.get('total_images'))} images of "
        f"{fmt.count(partition.get('total_patients'))} patients; patients shared "
        f"between any two sets: {fmt.count(partition.get('patient_overlap_total'))}"
    )
    return Table(headers, tuple(rows), caption)


def prevalence_table(partition: Mapping[str, Any]) -> Table | None:
    """Finding prevalence per set: share of images (positive count)."""
    sets = _sets(partition)
    findings: list[str] = []
    for _, s in sets:
        for finding in s.get("prevalence") or {}:
            if finding not in findings:
                findings.append(finding)
    if not findings:
        return None
    rows = []
    for finding in findings:
        row = [finding]
        for _, s in sets:
            prev = (s.get("prevalence") or {}).get(finding)
            pos = (s.get("positives") or {}).get(finding)
            row.append(f"{fmt.percent(prev)} ({fmt.count(pos)})")
        rows.append(tuple(row))
    return Table(
        tuple(["Finding"] + [name for name, _ in sets]),
        tuple(rows),
        "Finding prevalence per set: share of images (positive images)",
    )


def deid_table(deid: Mapping[str, Any]) -> Table:
    """De-identification checks: what was looked at, what was found, the rule applied."""
    checks = deid.get("checks") or {}
    rows = []
    columns = checks.get("columns") or {}
    if columns:
        rows.append(
            (
                "Columns against allow-list",
                fmt.count(len(columns.get("looked_at") or [])),
                fmt.count(len(columns.get("violations") or [])),
                f"allowed: {', '.join(columns.get('allowed') or [])}",
            )
        )
    ids = checks.get("patient_ids") or {}
    if ids:
        rows.append(
            (
                "Patient IDs pseudonymized",
                fmt.count(ids.get("looked_at")),
                f"{fmt.count(ids.get('collisions'))} collisions",
                f"{ids.get('method', fmt.MISSING)}; {fmt.count(ids.get('patients'))} patients",
            )
        )
    ages = checks.get("ages") or {}
    for key, title in (("over_limit", "Ages over the limit"), ("impossible", "Impossible ages")):
        check = ages.get(key) or {}
        if check:
            rule = check.get("rule", "")
            if check.get("action"):
                rule += f"; {check['action']}"
            rows.append(
                (title, fmt.count(ages.get("looked_at")), fmt.count(check.get("count")), rule)
            )
    names = checks.get("file_names") or {}
    if names:
        rows.append(
            (
                "Image file names",
                fmt.count(names.get("looked_at")),
                fmt.count((names.get("violations") or {}).get("count")),
                f"pattern {names.get('pattern', fmt.MISSING)}",
            )
        )
    chunks = checks.get("png_chunks") or {}
    if chunks:
        rows.append(
            (
                "PNG metadata chunks",
                fmt.count(chunks.get("looked_at")),
                fmt.count(chunks.get("images_with_chunks")),
                f"types {', '.join(chunks.get('types_checked') or [])}; "
                f"{chunks.get('note', '')}".strip("; "),
            )
        )
    return Table(
        ("Check", "Looked at", "Found", "Rule / action"),
        tuple(rows),
        "De-identification checks (reports/deid.json)",
    )


def epsilon_by_round(
    federated: Mapping[str, Any] | None, site_curves: Mapping[str, Mapping[str, Curve]]
) -> dict[str, dict[int, float]]:
    """site -> round -> ε, from federated.json per_round (or DVCLive epsilon.tsv files)."""
    out: dict[str, dict[int, float]] = {}
    for record in (federated or {}).get("per_round") or []:
        for site, s in (record.get("sites") or {}).items():
            eps = fmt.number((s or {}).get("epsilon"))
            if eps is not None:
                out.setdefault(site, {})[int(record.get("round", 0))] = eps
    if out:
        return out
    for site, curves in site_curves.items():
        if "epsilon" in curves:
            c = curves["epsilon"]
            out[site] = {int(x): float(y) for x, y in zip(c.x, c.y, strict=True)}
    return out


def epsilon_table(epsilon: Mapping[str, Mapping[int, float]], delta: Any) -> Table | None:
    """ε per site (columns) and round (rows)."""
    if not epsilon:
        return None
    sites = sorted(epsilon)
    rounds = sorted({r for per_round in epsilon.values() for r in per_round})
    rows = tuple(tuple([str(r)] + [fmt.num(epsilon[s].get(r), 3) for s in sites]) for r in rounds)
    d = fmt.number(delta)
    caption = "Privacy spent: cumulative ε per site after each round" + (
        f" (δ = {d:g})" if d is not None else ""
    )
    return Table(tuple(["Round", *sites]), rows, caption)


ACCOUNTANTS: dict[str, str] = {
    "prv": "PRV accountant (privacy random variables: numerical composition, tight)",
    "rdp": "RDP accountant (Rényi DP: an upper bound, looser than PRV)",
}


def recorded_accountant(federated: Mapping[str, Any] | None) -> str | None:
    """The accountant a federation summary records ('accountant' or 'dp_accountant' at the top
    or in any round's site metrics); None when it records none."""
    federated = federated or {}
    for key in ("accountant", "dp_accountant"):
        if isinstance(federated.get(key), str):
            return federated[key]
    for record in federated.get("per_round") or []:
        for site in (record.get("sites") or {}).values():
            for key in ("accountant", "dp_accountant"):
                if isinstance((site or {}).get(key), str):
                    return site[key]
    return None


def accountant_phrase(kind: str) -> str:
    """'Opacus's PRV accountant (...)' for a dp.accountant value."""
    return f"Opacus's {ACCOUNTANTS.get(kind, f'{kind!r} accountant')}"
