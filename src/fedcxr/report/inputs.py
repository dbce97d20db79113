"""Where the report's inputs live, and reading them: every file optional, malformed ones errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TASKS: tuple[str, ...] = ("multilabel", "pneumonia")


@dataclass(frozen=True)
class ReportPaths:
    """Input locations; the defaults are the pipeline's, relative to the repository root."""

    metrics: Path = Path("reports/metrics.json")
    efficiency: Path = Path("reports/efficiency.json")
    roc_dir: Path = Path("reports/plots/roc")  # <task>/<config>.csv with columns fpr,tpr
    live_dir: Path = Path("reports/live/federated/plots/metrics")  # DVCLive per-round TSVs
    federated: Path = Path("reports/federated.json")
    partition: Path = Path("reports/partition.json")
    deid: Path = Path("reports/deid.json")
    ingest: Path = Path("reports/ingest.json")
    gradcam_dir: Path = Path("reports/figures")  # gradcam_<task>.png
    curves: Path = Path("reports/curves.json")  # task -> config -> "s<seed>" -> learning curve

    def under(self, root: Path) -> ReportPaths:
        """The same layout below another folder (a test fixture, another checkout)."""
        return replace(self, **{name: Path(root) / value for name, value in self.__dict__.items()})


@dataclass(frozen=True)
class RunContext:
    """Settings of the run that the metrics files do not record (from params.yaml)."""

    data_source: str | None = None
    arch: str | None = None
    image_size: int | None = None
    seeds: tuple[int, ...] = ()
    rounds: int | None = None
    local_epochs: int | None = None
    strategy: str | None = None
    dp_enabled: bool | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float | None = None
    dp_accountant: str | None = None  # params dp.accountant (rdp | prv), where params have it
    batch_size: int | None = None  # params train.batch_size: optimizer steps per epoch


@dataclass(frozen=True)
class Curve:
    """One per-round series: x = round number (1-based), y = value."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class LearningCurve:
    """One run's learning curve: x = cumulative local epochs, y = validation macro AUROC on the
    pooled validation splits (NaN where undefined), and whether the run converged."""

    x: np.ndarray
    y: np.ndarray
    converged: bool


# task -> config -> seed tag ("s42") -> curve
LearningCurves = dict[str, dict[str, dict[str, LearningCurve]]]


@dataclass
class ReportData:
    """Everything the report shows, as read; None where the file was absent."""

    paths: ReportPaths
    metrics: dict[str, Any] | None = None
    efficiency: dict[str, Any] | None = None
    federated: dict[str, Any] | None = None
    partition: dict[str, Any] | None = None
    deid: dict[str, Any] | None = None
    ingest: dict[str, Any] | None = None
    roc: dict[str, dict[str, Curve]] = field(default_factory=dict)  # task -> config -> fpr/tpr
    global_curves: dict[str, Curve] = field(default_factory=dict)  # name -> curve
    site_curves: dict[str, dict[str, Curve]] = field(default_factory=dict)  # site -> name -> c
    gradcam: dict[str, Path] = field(default_factory=dict)  # task -> PNG
    learning: LearningCurves = field(default_factory=dict)  # from curves.json
    absent: list[str] = field(default_factory=list)  # input paths that were not found

    def configs(self) -> dict[str, dict[str, Any]]:
        """metrics.json without its 'comparisons' entry: config -> task -> metrics."""
        if not self.metrics:
            return {}
        return {k: v for k, v in self.metrics.items() if k != "comparisons"}

    def comparisons(self) -> dict[str, dict[str, Any]]:
        """metrics.json 'comparisons': task -> '<a>_vs_<b>' -> statistics."""
        return dict((self.metrics or {}).get("comparisons") or {})

    def tasks(self) -> list[str]:
        """Tasks present in any configuration, known tasks first."""
        found = {t for per_task in self.configs().values() for t in per_task}
        return [t for t in TASKS if t in found] + sorted(found - set(TASKS))


def read_json(path: Path, absent: list[str]) -> dict[str, Any] | None:
    """A JSON object from `path`; None (and the path noted in `absent`) when there is no file."""
    if not path.is_file():
        absent.append(str(path))
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: expected valid JSON, found a parse error: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object at the top level, found {type(data).__name__}"
        )
    return data


def check_metrics(metrics: Mapping[str, Any], source: str) -> None:
    """metrics.json must map config -> task -> object (plus an optional 'comparisons' object)."""
    for config, per_task in metrics.items():
        if not isinstance(per_task, dict):
            raise ValueError(
                f"{source}: expected '{config}' to map task names to metric objects, found "
                f"{type(per_task).__name__}"
            )
        for task, values in per_task.items():
            if not isinstance(values, dict):
                raise ValueError(
                    f"{source}: expected '{config}.{task}' to be an object of metrics, found "
                    f"{type(values).__name__}"
                )


def read_table(path: Path, columns: tuple[str, ...], sep: str = ",") -> pd.DataFrame:
    """A CSV/TSV file that must hold `columns` (extra columns are ignored)."""
    try:
        frame = pd.read_csv(path, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: expected a table with columns {list(columns)}: {exc}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: expected column(s) {list(columns)}, found {list(frame.columns)}")
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any():
        raise ValueError(
            f"{path}: expected numbers in columns {list(columns)}, found blanks or text"
        )
    return values


def read_roc(path: Path) -> Curve:
    """An ROC curve file with columns fpr,tpr."""
    frame = read_table(path, ("fpr", "tpr"))
    return Curve(frame["fpr"].to_numpy(float), frame["tpr"].to_numpy(float))


def read_live(path: Path) -> Curve:
    """A DVCLive series `step<TAB>name`; steps are 0-based, rounds are reported 1-based."""
    name = path.stem
    frame = read_table(path, ("step", name), sep="\t")
    return Curve(frame["step"].to_numpy(float) + 1.0, frame[name].to_numpy(float))


def _learning_curve(item: Any, where: str) -> LearningCurve:
    if not isinstance(item, dict) or not isinstance(item.get("converged"), bool):
        raise ValueError(f"{where}: expected an object with 'curve' and 'converged' (true/false)")
    points = item.get("curve")
    if not isinstance(points, list):
        raise ValueError(f"{where}.curve: expected a list of [epochs, val_auroc] pairs")
    xs, ys = [], []
    for point in points:
        pair = isinstance(point, list) and len(point) == 2
        if not pair or not _is_number(point[0]) or not (point[1] is None or _is_number(point[1])):
            raise ValueError(
                f"{where}.curve: expected [epochs, val_auroc or null] pairs, found {point!r}"
            )
        xs.append(float(point[0]))
        ys.append(np.nan if point[1] is None else float(point[1]))
    return LearningCurve(np.asarray(xs, float), np.asarray(ys, float), item["converged"])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_curves(path: Path, absent: list[str]) -> LearningCurves:
    """curves.json: task -> config -> "s<seed>" -> {"curve": [[epochs, auroc], ...],
    "converged": bool}; {} (and the path noted in `absent`) when there is no file."""
    data = read_json(path, absent)
    out: LearningCurves = {}
    for task, per_config in (data or {}).items():
        if not isinstance(per_config, dict):
            raise ValueError(f"{path}: expected '{task}' to map configurations to runs")
        for config, per_seed in per_config.items():
            if not isinstance(per_seed, dict):
                raise ValueError(f"{path}: expected '{task}.{config}' to map seeds to curves")
            for seed, item in per_seed.items():
                curve = _learning_curve(item, f"{path}: '{task}.{config}.{seed}'")
                out.setdefault(task, {}).setdefault(config, {})[seed] = curve
    return out


def _read_live_dir(folder: Path) -> dict[str, Curve]:
    return {p.stem: read_live(p) for p in sorted(folder.glob("*.tsv"))}


def load_inputs(paths: ReportPaths) -> ReportData:
    """Read every input that exists; record the ones that do not."""
    data = ReportData(paths=paths)
    absent = data.absent
    data.metrics = read_json(paths.metrics, absent)
    if data.metrics is not None:
        check_metrics(data.metrics, str(paths.metrics))
    data.efficiency = read_json(paths.efficiency, absent)
    if data.efficiency is not None:
        check_metrics(data.efficiency, str(paths.efficiency))
    data.federated = read_json(paths.federated, absent)
    data.partition = read_json(paths.partition, absent)
    data.deid = read_json(paths.deid, absent)
    data.ingest = read_json(paths.ingest, absent)
    data.learning = read_curves(paths.curves, absent)

    if paths.roc_dir.is_dir():
        for task_dir in sorted(p for p in paths.roc_dir.iterdir() if p.is_dir()):
            curves = {p.stem: read_roc(p) for p in sorted(task_dir.glob("*.csv"))}
            if curves:
                data.roc[task_dir.name] = curves
    else:
        absent.append(str(paths.roc_dir))

    if paths.live_dir.is_dir():
        data.global_curves = _read_live_dir(paths.live_dir)
        for site_dir in sorted(p for p in paths.live_dir.iterdir() if p.is_dir()):
            curves = _read_live_dir(site_dir)
            if curves:
                data.site_curves[site_dir.name] = curves
    else:
        absent.append(str(paths.live_dir))

    for task in TASKS:
        png = paths.gradcam_dir / f"gradcam_{task}.png"
        if png.is_file():
            data.gradcam[task] = png
        else:
            absent.append(str(png))
    return data
