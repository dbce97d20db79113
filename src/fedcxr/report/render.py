"""Assemble the study report from the metrics files and write Markdown and self-contained HTML."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcxr.report import budgets, fmt, paper, tables
from fedcxr.report.document import (
    AnyBlock,
    Bullets,
    Figure,
    Heading,
    Note,
    Para,
    to_html,
    to_markdown,
)
from fedcxr.report.figures import (
    epsilon_figure,
    forest_figure,
    learning_figure,
    roc_figure,
    training_figure,
)
from fedcxr.report.inputs import ReportData, ReportPaths, RunContext, load_inputs
from fedcxr.report.reading import reading
from fedcxr.report.tables import task_label

TITLE = "fedcxr — federated chest X-ray diagnosis: study report"
SECTIONS: tuple[str, ...] = (
    "Run summary",
    "Reading the results",
    "Learning curves",
    "Convergence and budgets",
    "Table 1 — Classification performance",
    "Table 2 — Pneumonia sensitivity and specificity",
    "Table 3 — Training efficiency",
    "Per-label AUROC",
    "Site data cards",
    "De-identification",
    "Differential privacy: ε per site and round",
    "ROC curves",
    "Federated rounds per site",
    "Grad-CAM",
)


@dataclass(frozen=True)
class ReportResult:
    """What render_report wrote, and which inputs it did not find."""

    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    absent: tuple[str, ...]


@dataclass
class _Doc:
    blocks: list[AnyBlock]
    figures: dict[str, bytes]  # generated PNGs by file name
    figures_rel: str  # the figure folder relative to the Markdown file
    md_dir: Path

    def add(self, *blocks: AnyBlock) -> None:
        self.blocks.extend(blocks)

    def figure(self, name: str, png: bytes, caption: str) -> None:
        self.figures[name] = png
        self.add(Figure(png, caption, f"{self.figures_rel}/{name}"))

    def existing(self, path: Path, caption: str) -> None:
        self.add(Figure(path.read_bytes(), caption, _rel(path, self.md_dir)))


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _names(configs: list[str]) -> str:
    return ", ".join(tables.config_label(c) for c in configs) or "none"


def _summary(doc: _Doc, data: ReportData, context: RunContext) -> None:
    ingest, partition, federated = data.ingest or {}, data.partition or {}, data.federated or {}
    configs = data.configs()
    doc.add(
        Para(
            f"A reproduction of {paper.CITATION}. Every number below is read from the "
            f"pipeline's output files; the paper's published numbers (the 'paper' columns) "
            f"come from one cited table, fedcxr.report.paper."
        )
    )
    _forest(doc, data)
    items = []
    source = context.data_source or (ingest.get("params") or {}).get("source")
    if source or ingest:
        where = (
            f" ({ingest['source']}, metadata layout {ingest.get('metadata_layout', '?')})"
            if ingest.get("source")
            else ""
        )
        items.append(f"Data source: {source or fmt.MISSING}{where}")
    if ingest:
        items.append(
            f"Images ingested: {fmt.count(ingest.get('usable'))} usable of "
            f"{fmt.count(ingest.get('images_found'))} found"
        )
    if partition:
        sets = partition.get("sets") or {}
        sites = [s for s in sets if s != "test"]
        test = sets.get("test") or {}
        items.append(
            f"Partition ({partition.get('strategy', fmt.MISSING)}, seed "
            f"{partition.get('seed', fmt.MISSING)}): "
            f"{fmt.count(partition.get('total_images'))} images of "
            f"{fmt.count(partition.get('total_patients'))} patients into "
            f"{len(sites)} sites and a held-out test set of "
            f"{fmt.count(test.get('images'))} images"
        )
        sizes = partition.get("sizes") or {}
        if sizes.get("note"):
            exact = "met exactly" if partition.get("exact_sizes") else "not the configured counts"
            items.append(f"Set sizes: {sizes['note']} ({exact})")
    for task in data.tasks():
        items.append(
            f"Task {task_label(task)}: {tables.test_set_size(configs, task)}; "
            f"configurations: {_names(tables.configs_with(configs, task))}"
        )
    seeds = sorted(
        {
            m.get("n_seeds")
            for per in configs.values()
            for m in per.values()
            if isinstance(m.get("n_seeds"), int)
        }
    )
    if seeds:
        items.append(f"Seeds per configuration (metrics n_seeds): {', '.join(map(str, seeds))}")
    if context.seeds:
        items.append(f"Training seeds (params): {', '.join(map(str, context.seeds))}")
    if context.arch:
        size = f" at {context.image_size}×{context.image_size} pixels" if context.image_size else ""
        items.append(f"Model: {context.arch}{size}")
    if federated or context.rounds:
        audit = {True: "verified", False: "FAILED"}.get(federated.get("audit_ok"), "not recorded")
        rounds = federated.get("rounds", context.rounds)
        epochs = _plural(context.local_epochs, "local epoch") if context.local_epochs else ""
        items.append(
            f"Federated training: {fmt.count(rounds)} rounds{epochs} of "
            f"{federated.get('strategy', context.strategy or fmt.MISSING)} over "
            f"{len(federated.get('sites') or []) or fmt.MISSING} sites; audit log {audit}"
        )
    if context.dp_enabled is not None:
        items.append(f"Differential privacy (params): {_dp_setting(context)}")
    doc.add(Bullets(tuple(items)) if items else Note("No run description found."))
    if data.absent:
        doc.add(
            Note(
                "Inputs not found (the sections that need them say so): "
                + ", ".join(data.absent)
                + "."
            )
        )


def _forest(doc: _Doc, data: ReportData) -> None:
    """The first figure: every configuration's test AUROC with its 95% CI, per task."""
    configs, tasks = data.configs(), data.tasks()
    png = forest_figure(configs, tasks)
    if png is None:
        return  # no AUROC at all: Table 1's section says what is missing
    sizes = "; ".join(f"{task_label(t)}: {tables.test_set_size(configs, t)}" for t in tasks)
    doc.figure(
        "forest_auroc.png",
        png,
        f"Test AUROC of every configuration, point estimate and 95% CI ({sizes}); "
        f"multi-label is the macro average over the findings. Dashed line, where present: "
        f"the better of the centralized and single-node models. Configurations without "
        f"metrics are not shown; Reading the results gives the paired tests.",
    )


def _plural(n: int, noun: str) -> str:
    return f" × {n} {noun}{'' if n == 1 else 's'}"


def _dp_setting(context: RunContext) -> str:
    if not context.dp_enabled:
        return "off"
    parts = ["on"]
    if context.dp_noise_multiplier is not None:
        parts.append(f"noise multiplier {context.dp_noise_multiplier:g}")
    if context.dp_delta is not None:
        parts.append(f"δ = {context.dp_delta:g}")
    return ", ".join(parts)


def _table1(doc: _Doc, data: ReportData) -> None:
    configs = data.configs()
    tasks = data.tasks()
    if not tasks:
        doc.add(Note(f"No classification metrics: {data.paths.metrics} is absent or empty."))
        return
    for i, task in enumerate(tasks):
        doc.add(tables.performance_table(configs, task, "ab"[i] if i < 2 else str(i)))
        missing = [c for c in paper.PAPER_CONFIGS if c not in tables.configs_with(configs, task)]
        if missing:
            doc.add(
                Note(
                    f"Not in {data.paths.metrics} for task {task}: {_names(missing)} "
                    f"(the paper's rows for these are not shown)."
                )
            )


def _table2(doc: _Doc, data: ReportData) -> None:
    table = tables.pneumonia_table(data.configs(), data.tasks())
    if table is None:
        doc.add(
            Note(
                f"No pneumonia sensitivity or specificity in {data.paths.metrics} "
                f"(task 'pneumonia' absent or values null)."
            )
        )
        return
    doc.add(table)


def _table3(doc: _Doc, data: ReportData) -> None:
    table = tables.efficiency_table(data.efficiency or {})
    if table is None:
        doc.add(Note(f"No efficiency figures: {data.paths.efficiency} is absent or empty."))
        return
    doc.add(table)
    doc.add(
        Para(
            "Times here are seconds on this run's hardware; the paper's are hours per "
            "epoch on its GPU cluster, so only the ratios between configurations are "
            "comparable."
        )
    )


def _per_label(doc: _Doc, data: ReportData) -> None:
    found = False
    for task in data.tasks():
        table = tables.per_label_table(data.configs(), task)
        if table is not None:
            doc.add(table)
            found = True
    if not found:
        doc.add(Note(f"No per-finding AUROC in {data.paths.metrics}."))


def _sites(doc: _Doc, data: ReportData) -> None:
    if not data.partition:
        doc.add(Note(f"No site data cards: {data.paths.partition} is absent."))
        return
    for table in (
        tables.site_overview_table(data.partition),
        tables.prevalence_table(data.partition),
    ):
        if table is not None:
            doc.add(table)


def _deid(doc: _Doc, data: ReportData) -> None:
    deid = data.deid
    if not deid:
        doc.add(Note(f"No de-identification summary: {data.paths.deid} is absent."))
        return
    passed = {True: "passed", False: "FAILED"}.get(deid.get("passed"), "not recorded")
    actions = deid.get("actions") or []
    doc.add(
        Para(
            f"De-identification {passed}: {fmt.count(deid.get('images'))} images, "
            f"{fmt.count(deid.get('violations'))} violations, policy on violation "
            f"'{deid.get('on_violation', fmt.MISSING)}', scrubbed: "
            f"{'yes' if deid.get('scrubbed') else 'no'}, actions taken: {len(actions)}."
        )
    )
    doc.add(tables.deid_table(deid))
    ids = (deid.get("checks") or {}).get("patient_ids") or {}
    if ids.get("development_secret"):
        doc.add(Note(f"Pseudonyms were made with the {ids.get('secret', 'development secret')}."))


def _dp(doc: _Doc, data: ReportData, context: RunContext) -> None:
    eps = tables.epsilon_by_round(data.federated, data.site_curves)
    table = tables.epsilon_table(eps, context.dp_delta)
    if table is None:
        where = f"no ε in {data.paths.federated} nor an epsilon.tsv under {data.paths.live_dir}"
        if context.dp_enabled:
            doc.add(Note(f"DP is enabled in params but no privacy spending was recorded: {where}."))
        else:
            doc.add(Note(f"DP was not enabled in this run: {where}."))
        return
    doc.add(table)
    doc.figure("epsilon.png", epsilon_figure(eps), "Cumulative ε per site over rounds")
    kind = tables.recorded_accountant(data.federated)
    if kind is not None:
        doc.add(
            Para(
                f"ε computed by {tables.accountant_phrase(kind)}, as recorded in "
                f"{data.paths.federated}."
            )
        )
    elif context.dp_accountant is not None:
        doc.add(
            Para(
                f"ε computed by {tables.accountant_phrase(context.dp_accountant)}, as set "
                f"in params (dp.accountant: {context.dp_accountant}); the training summary "
                f"does not record it."
            )
        )
    else:
        doc.add(
            Note(
                f"Which accountant computed ε is recorded neither in {data.paths.federated} "
                f"nor in params (dp.accountant); Opacus's RDP and PRV accountants can "
                f"differ twofold."
            )
        )
    sigma = context.dp_noise_multiplier
    if sigma is not None:
        doc.add(
            Para(
                f"DP-SGD noise multiplier σ = {sigma:g} (the paper: σ = "
                f"{paper.DP_NOISE_MULTIPLIER:g}, Section 4.5, with no ε reported). ε grows with "
                f"every round because each site's accountant spans the whole run."
            )
        )


def _roc(doc: _Doc, data: ReportData) -> None:
    labels = {c: tables.config_label(c) for c in tables.ordered(data.configs())}
    for task, curves in data.roc.items():
        curves = {c: curves[c] for c in tables.ordered(curves)}
        kind = "pneumonia" if task == "pneumonia" else "micro-averaged over the 14 findings"
        names = {c: tables.config_label(c) for c in curves} | labels
        title = f"ROC — {task_label(task)}\n{kind}"
        doc.figure(
            f"roc_{task}.png",
            roc_figure(curves, names, title),
            f"ROC curves on the held-out test set, {task_label(task)}: {kind}; the legend "
            f"gives the area under each plotted curve",
        )
    missing = [t for t in data.tasks() if t not in data.roc]
    if missing or not data.roc:
        doc.add(
            Note(
                f"No ROC curves under {data.paths.roc_dir} for: {', '.join(missing) or 'any task'}."
            )
        )


def _plateau_rule(configs: dict[str, dict[str, Any]]) -> str:
    for per_task in configs.values():
        for m in per_task.values():
            t = m.get("training") or {}
            if t.get("plateau_window") is not None and t.get("plateau_tol") is not None:
                return (
                    f" (its last {t['plateau_window']} evaluations gained at most "
                    f"{t['plateau_tol']} over the best before them)"
                )
    return ""


def _learning(doc: _Doc, data: ReportData) -> None:
    """Every configuration's validation AUROC against cumulative local epochs, per task."""
    png = learning_figure(data.learning, data.tasks())
    if png is None:
        doc.add(Note(f"No learning curves: {data.paths.curves} is absent or empty."))
        return
    doc.figure(
        "learning_curves.png",
        png,
        "Learning curves: validation macro AUROC on the pooled validation splits of every "
        "site against cumulative local epochs (passes over each training image), one panel "
        "per task. Pooled and site-local runs are evaluated after every epoch, federated runs "
        "after every round (at round × local epochs). One line per seed; a filled marker ends "
        f"a run that converged{_plateau_rule(data.configs())}, a hollow marker on a dashed "
        "line one that was still improving; site-local models in grey.",
    )


def _convergence(doc: _Doc, data: ReportData, context: RunContext) -> None:
    """Per configuration: budget, best / final validation AUROC, converged; how steps differ."""
    configs = data.configs()
    if not budgets.recorded(configs):
        doc.add(
            Note(
                f"No training records ('training' entries) in {data.paths.metrics}: budgets "
                f"and convergence are unknown."
            )
        )
        return
    for task in data.tasks():
        table = budgets.convergence_table(configs, task)
        if table is not None:
            doc.add(table)
    items = [s for s in [budgets.budget_sentence(configs)] if s]
    rounds = fmt.number((data.federated or {}).get("rounds")) or context.rounds
    items += budgets.steps_lines(
        configs,
        data.partition,
        context.batch_size,
        None if rounds is None else int(rounds),
        context.local_epochs,
    )
    items += [line for t in data.tasks() if (line := budgets.reach_line(configs, t))]
    if items:
        doc.add(Bullets(tuple(items)))


def _training(doc: _Doc, data: ReportData) -> None:
    if not data.global_curves and not data.site_curves:
        doc.add(Note(f"No per-round curves: {data.paths.live_dir} is absent or empty."))
        return
    rounds = max((len(c.x) for c in data.global_curves.values()), default=0)
    doc.figure(
        "training_curves.png",
        training_figure(data.global_curves, data.site_curves),
        f"One federation over {rounds} rounds (DVCLive): the global model's validation AUROC "
        f"and mean train loss, and each of {len(data.site_curves)} sites' train loss "
        f"and validation AUROC on its own validation split",
    )


def _gradcam(doc: _Doc, data: ReportData) -> None:
    for task, path in data.gradcam.items():
        doc.existing(
            path, f"Grad-CAM, {task_label(task)}: where the federated model looks on test X-rays"
        )
    missing = [t for t in data.tasks() if t not in data.gradcam]
    if missing or not data.gradcam:
        doc.add(
            Note(
                f"No Grad-CAM panel in {data.paths.gradcam_dir} for: "
                f"{', '.join(missing) or 'any task'}."
            )
        )


def build_document(
    data: ReportData, context: RunContext, figures_rel: str, md_dir: Path
) -> tuple[list[AnyBlock], dict[str, bytes]]:
    """The report as blocks, and the PNGs it generated (by file name)."""
    doc = _Doc([Heading(TITLE, 1)], {}, figures_rel, md_dir)
    sections: list[tuple[str, Any]] = [
        (SECTIONS[0], lambda: _summary(doc, data, context)),
        (SECTIONS[1], lambda: doc.add(Bullets(tuple(reading(data, context))))),
        (SECTIONS[2], lambda: _learning(doc, data)),
        (SECTIONS[3], lambda: _convergence(doc, data, context)),
        (SECTIONS[4], lambda: _table1(doc, data)),
        (SECTIONS[5], lambda: _table2(doc, data)),
        (SECTIONS[6], lambda: _table3(doc, data)),
        (SECTIONS[7], lambda: _per_label(doc, data)),
        (SECTIONS[8], lambda: _sites(doc, data)),
        (SECTIONS[9], lambda: _deid(doc, data)),
        (SECTIONS[10], lambda: _dp(doc, data, context)),
        (SECTIONS[11], lambda: _roc(doc, data)),
        (SECTIONS[12], lambda: _training(doc, data)),
        (SECTIONS[13], lambda: _gradcam(doc, data)),
    ]
    for heading, fill in sections:
        doc.add(Heading(heading))
        fill()
    return doc.blocks, doc.figures


def render_report(
    paths: ReportPaths | None = None,
    out_md: Path = Path("reports/report.md"),
    out_html: Path = Path("reports/report.html"),
    figures_dir: Path | None = None,
    context: RunContext | None = None,
) -> ReportResult:
    """Read the inputs at `paths`, write `out_md` (figures as PNG files in `figures_dir`,
    default `<out_md dir>/report_figures`) and a self-contained `out_html`.

    `paths` defaults to the pipeline's layout (ReportPaths()); `context` adds run settings that
    the metrics files do not record (model, image size, seeds), used in the summary and reading.
    """
    paths = paths or ReportPaths()
    context = context or RunContext()
    out_md, out_html = Path(out_md), Path(out_html)
    figures_dir = Path(figures_dir) if figures_dir else out_md.parent / "report_figures"
    data = load_inputs(paths)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    blocks, pngs = build_document(data, context, _rel(figures_dir, out_md.parent), out_md.parent)
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, png in pngs.items():
        (figures_dir / name).write_bytes(png)
        written.append(figures_dir / name)
    out_md.write_text(to_markdown(blocks))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(to_html(blocks, TITLE))
    return ReportResult(out_md, out_html, tuple(written), tuple(data.absent))
