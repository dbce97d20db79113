"""Reads NIH ChestX-ray14 metadata CSVs (2017 and v2020 layouts) into one canonical table."""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.labels import FINDINGS, NO_FINDING

# NIH header -> canonical column. The 2017 header splits "OriginalImage[Width,Height]" at the
# comma, and ends with a trailing comma (an empty unnamed column); v2020 drops that column.
NIH_COLUMNS: dict[str, str] = {
    "Image Index": "image_index",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
    "OriginalImage[Width": "orig_width",
    "Height]": "orig_height",
    "OriginalImagePixelSpacing[x": "spacing_x",
    "y]": "spacing_y",
}
REQUIRED = ("image_index", "finding_labels", "follow_up", "patient_id", "age", "sex", "view")
CANONICAL_TO_NIH = {v: k for k, v in NIH_COLUMNS.items()}
METADATA_GLOBS = ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)


class MetadataError(ValueError):
    """A metadata file that cannot be read as NIH ChestX-ray14 metadata."""


@dataclass(frozen=True)
class MetadataInfo:
    """Where the metadata came from and how it was laid out."""

    path: str
    layout: str  # "nih-2017" | "nih-v2020"
    rows: int
    extra_columns: tuple[str, ...]  # columns outside NIH's schema (deid flags them)


def embedded_metadata_path() -> Path:
    """The real NIH metadata (112,120 rows) shipped inside the torchxrayvision wheel."""
    path = importlib.resources.files("torchxrayvision") / "data" / "Data_Entry_2017_v2020.csv.gz"
    return Path(str(path))


def embedded_bbox_path() -> Path:
    """NIH's BBox_List_2017 (984 lesion boxes) shipped inside the torchxrayvision wheel."""
    return Path(
        str(importlib.resources.files("torchxrayvision") / "data" / "BBox_List_2017.csv.gz")
    )


def find_metadata_file(folder: Path) -> Path:
    """The single Data_Entry_2017*.csv(.gz) in an NIH-format folder."""
    found = sorted({p for pattern in METADATA_GLOBS for p in folder.glob(pattern)})
    if not found:
        raise MetadataError(
            f"no metadata CSV in {folder}: expected a file named like 'Data_Entry_2017.csv' "
            "or 'Data_Entry_2017_v2020.csv' (NIH ChestX-ray14 layout)"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise MetadataError(f"several metadata CSVs in {folder} ({names}); keep exactly one")
    return found[0]


def parse_age(value: object) -> float:
    """NIH ages are integers in years; some copies write '058Y'. Months/weeks/days -> 0 years."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    match = _AGE.match(str(value))
    if not match:
        return float("nan")
    number, unit = float(match.group(1)), match.group(2).upper()
    return number if unit in ("", "Y") else 0.0


def read_metadata(path: str | Path) -> tuple[pd.DataFrame, MetadataInfo]:
    """Read an NIH metadata CSV into canonical columns, sorted by image index.

    Known columns are renamed (see NIH_COLUMNS); columns outside NIH's schema keep their
    names so the de-identification stage can flag them. Adds one 0/1 column per finding.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MetadataError(f"cannot read metadata CSV {path}: {exc}") from exc
    unnamed = [c for c in raw.columns if str(c).startswith("Unnamed:")]
    empty_unnamed = [c for c in unnamed if (raw[c].str.strip() == "").all()]
    layout = "nih-2017" if empty_unnamed else "nih-v2020"
    raw = raw.drop(columns=empty_unnamed)
    df = raw.rename(columns=NIH_COLUMNS)
    missing = [CANONICAL_TO_NIH[c] for c in REQUIRED if c not in df.columns]
    if missing:
        raise MetadataError(
            f"{path}: missing column(s) {missing}; found {list(raw.columns)}. "
            "Expected NIH ChestX-ray14 metadata (Data_Entry_2017.csv)."
        )
    df["image_index"] = df["image_index"].str.strip()
    duplicated = df["image_index"][df["image_index"].duplicated()]
    if len(duplicated):
        raise MetadataError(
            f"{path}: {len(duplicated)} duplicated 'Image Index' value(s), e.g. "
            f"{duplicated.iloc[:3].tolist()}"
        )
    df["patient_id"] = df["patient_id"].str.strip()
    df["raw_age"] = df["age"]
    df["age"] = df["age"].map(parse_age).astype(float)
    df["follow_up"] = pd.to_numeric(df["follow_up"], errors="coerce").fillna(-1).astype(int)
    for col in ("orig_width", "orig_height"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("spacing_x", "spacing_y"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    dummies = df["finding_labels"].str.replace(" ", "").str.get_dummies("|")
    unknown = sorted(set(dummies.columns) - set(FINDINGS) - {NO_FINDING.replace(" ", "")})
    if unknown:
        raise MetadataError(
            f"{path}: unknown finding label(s) {unknown} in 'Finding Labels'; expected any of "
            f"{', '.join(FINDINGS)} or {NO_FINDING!r}"
        )
    for finding in FINDINGS:
        present = finding in dummies.columns
        df[finding] = dummies[finding].to_numpy(np.int8) if present else np.int8(0)
    df = df.sort_values("image_index", kind="stable").reset_index(drop=True)
    known = set(NIH_COLUMNS.values()) | set(FINDINGS) | {"raw_age"}
    extra = tuple(c for c in df.columns if c not in known)
    info = MetadataInfo(path=str(path), layout=layout, rows=len(df), extra_columns=extra)
    return df, info


def read_bboxes(path: str | Path | None = None) -> pd.DataFrame:
    """NIH lesion boxes as (image_index, finding, x, y, w, h) in pixels of the 1024 image."""
    from fedcxr.labels import BBOX_LABEL_ALIASES

    raw = pd.read_csv(path or embedded_bbox_path())
    out = pd.DataFrame(
        {
            "image_index": raw["Image Index"].astype(str),
            "finding": raw["Finding Label"].astype(str).replace(BBOX_LABEL_ALIASES),
            "x": raw["Bbox [x"].astype(float),
            "y": raw["y"].astype(float),
            "w": raw["w"].astype(float),
            "h": raw["h]"].astype(float),
        }
    )
    return out
