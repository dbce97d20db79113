"""Review a change in CI: AUROC changes between two metrics files, marked against the noise."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

METRIC = "auroc_macro"  # the headline number of every configuration and task
WITHIN = "within noise"
BEYOND = "beyond noise"
NA = "n/a"
TOLERANCE = 1e-12  # float rounding: a delta equal to the half-width counts as within noise
Verdict = Literal["within noise", "beyond noise", "n/a"]


@dataclass(frozen=True)
class Change:
    """One configuration/task's macro AUROC in the baseline and in the change."""

    config: str
    task: str
    base: float | None  # None: not in the baseline (or no AUROC there)
    new: float | None  # None: not in the change (or no AUROC there)
    half_width: float | None  # the change's 95% CI half-width, (hi - lo) / 2; None: no CI

    @property
    def delta(self) -> float | None:
        if self.base is None or self.new is None:
            return None
        return self.new - self.base

    @property
    def verdict(self) -> Verdict:
        """Within noise when |delta| <= the CI half-width, beyond noise when larger, n/a when
        either side or the interval is missing."""
        delta = self.delta
        if delta is None or self.half_width is None:
            return NA
        return BEYOND if abs(delta) > self.half_width + TOLERANCE else WITHIN

    @property
    def reason(self) -> str:
        """Why the verdict is "n/a" ("" otherwise)."""
        if self.base is None and self.new is None:
            return "no AUROC on either side"
        if self.base is None:
            return "not in baseline"
        if self.new is None:
            return "not in this change"
        if self.half_width is None:
            return "no confidence interval"
        return ""


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (null, NaN, a string, a missing key)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _entries(metrics: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(config, task) -> that entry of a metrics.json: every `<config>.<task>` dict holding an
    AUROC key (so `comparisons` and anything else without one is left out)."""
    found: dict[tuple[str, str], Mapping[str, Any]] = {}
    for config, tasks in metrics.items():
        if not isinstance(tasks, Mapping):
            continue
        for task, entry in tasks.items():
            if isinstance(entry, Mapping) and METRIC in entry:
                found[(config, task)] = entry
    return found


def half_width(entry: Mapping[str, Any]) -> float | None:
    """(hi - lo) / 2 of an entry's AUROC interval; None when a bound is missing."""
    lo, hi = _number(entry.get(f"{METRIC}_lo")), _number(entry.get(f"{METRIC}_hi"))
    if lo is None or hi is None:
        return None
    return (hi - lo) / 2


def auroc_changes(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every configuration/task in either metrics.json, sorted by task then configuration,
    with both AUROCs and the new run's CI half-width (the noise a delta is judged against)."""
    old, cur = _entries(base), _entries(new)
    changes = []
    for config, task in sorted(old.keys() | cur.keys(), key=lambda key: (key[1], key[0])):
        before, after = old.get((config, task)), cur.get((config, task))
        changes.append(
            Change(
                config=config,
                task=task,
                base=None if before is None else _number(before.get(METRIC)),
                new=None if after is None else _number(after.get(METRIC)),
                half_width=None if after is None else half_width(after),
            )
        )
    return changes


def changed_plots(plots: Mapping[str, Any]) -> list[str]:
    """The plots of `dvc plots diff REF --json` output whose data differ between the two
    revisions, each as its name with the source files that changed (where DVC names them);
    a source that only one revision has counts as changed, a plot neither has is left out."""
    # plot -> source -> revision -> its points; every revision of the diff (a plot that only
    # one revision has lists only that one)
    rows: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    revisions: set[str] = set()
    for name, items in (plots.get("data") or {}).items():
        for item in items or ():
            revisions.update(str(rev) for rev in item.get("revisions") or ())
            for row in ((item.get("content") or {}).get("data") or {}).get("values") or ():
                point = dict(row)
                revision, source = str(point.pop("rev", "")), str(point.pop("filename", ""))
                revisions.add(revision)
                rows.setdefault(name, {}).setdefault(source, {}).setdefault(revision, []).append(
                    point
                )
    found = []
    for name, sources in rows.items():
        changed = sorted(
            source
            for source, per_rev in sources.items()
            if per_rev.keys() != revisions
            or any(r != next(iter(per_rev.values())) for r in per_rev.values())
        )
        if changed:
            named = [source for source in changed if source]
            found.append(f"{name} ({', '.join(named)})" if named else name)
    return found


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def changes_table(changes: Sequence[Change]) -> str:
    """The AUROC changes as a Markdown table."""
    lines = [
        "| Task | Configuration | Baseline | This change | Δ AUROC | 95% CI ± | Verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in changes:
        verdict = c.verdict if c.verdict != NA else f"{NA} ({c.reason})"
        if c.verdict == BEYOND:
            verdict = f"**{verdict}**"
        cells = (
            c.task,
            c.config,
            _fmt(c.base),
            _fmt(c.new),
            _fmt(c.delta, signed=True),
            _fmt(c.half_width),
            verdict,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(
    changes: Sequence[Change],
    base_ref: str,
    metrics_diff: str,
    plots: Sequence[str] = (),
    plots_html: str | None = None,
) -> str:
    """The review: a summary line, the AUROC table with its noise column, the
    `dvc metrics diff` table (folded) and the plots that changed."""
    beyond = [c for c in changes if c.verdict == BEYOND]
    within = sum(c.verdict == WITHIN for c in changes)
    na = sum(c.verdict == NA for c in changes)
    if beyond:
        names = ", ".join(f"{c.config}/{c.task} ({_fmt(c.delta, signed=True)})" for c in beyond)
        headline = f"**{len(beyond)} AUROC change(s) beyond noise:** {names}."
    else:
        headline = "No AUROC change is beyond noise."
    parts = [
        f"## Review against `{base_ref}`",
        "",
        f"{headline} {within} within noise, {na} n/a.",
        "",
        "### Macro AUROC per configuration",
        "",
        "A change is *within noise* when it is no larger than half the width of this "
        "change's 95% confidence interval (patients resampled); such a change is not a finding.",
        "",
        changes_table(changes) if changes else "_No configuration has an AUROC on either side._",
        "",
        f"### `dvc metrics diff {base_ref}`",
        "",
    ]
    diff = metrics_diff.strip()
    if sum(line.startswith("|") for line in diff.splitlines()) > 2:  # header, rule, rows
        parts += ["<details><summary>Every changed metric</summary>", "", diff, "", "</details>"]
    else:
        parts.append("_No metric changed._")
    parts += ["", "### Plots", ""]
    if plots:
        parts += [f"Plots whose data changed since `{base_ref}`:", ""]
        parts += [f"- {plot}" for plot in plots]
    else:
        parts.append(f"_No plot changed since `{base_ref}`._")
    if plots_html:
        parts += ["", f"`dvc plots diff {base_ref}`: `{plots_html}`"]
    return "\n".join(parts) + "\n"


def _read_metrics(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise typer.BadParameter(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{what} {path}: expected a JSON object, found {type(data)}")
    return data


def _read_text(path: Path | None, option: str) -> str:
    if path is None:
        return ""
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist", param_hint=option)
    return path.read_text()


def review(
    base_metrics: Annotated[
        Path, typer.Argument(help="The baseline's metrics.json (e.g. from `git show REF:…`).")
    ],
    new_metrics: Annotated[Path, typer.Argument(help="This change's metrics.json.")],
    base_ref: Annotated[str, typer.Option(help="Name of the baseline, for the text.")] = "main",
    metrics_diff: Annotated[
        Path | None, typer.Option(help="File holding `dvc metrics diff REF --md` output.")
    ] = None,
    plots_json: Annotated[
        Path | None, typer.Option(help="File holding `dvc plots diff REF --json` output.")
    ] = None,
    plots_html: Annotated[
        str | None, typer.Option(help="Where `dvc plots diff` wrote its HTML.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write here (default: stdout).")] = None,
) -> None:
    """Write a Markdown review of a change: every configuration/task's macro AUROC change,
    marked "within noise" when no larger than the change's 95% CI half-width, plus the
    `dvc metrics diff` table and the changed plots (scripts/review.sh gathers those)."""
    changes = auroc_changes(
        _read_metrics(base_metrics, f"baseline metrics (of {base_ref})"),
        _read_metrics(new_metrics, "metrics"),
    )
    diff = _read_text(metrics_diff, "--metrics-diff")
    try:
        plots = changed_plots(json.loads(_read_text(plots_json, "--plots-json") or "{}"))
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{plots_json} is not JSON: {exc}", "--plots-json") from None
    text = render_markdown(changes, base_ref, diff, plots, plots_html)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


if __name__ == "__main__":
    typer.run(review)
