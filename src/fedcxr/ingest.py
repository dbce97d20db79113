"""Checks and hashes every image of an NIH-format folder against its metadata into a manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from fedcxr.config import IngestConfig
from fedcxr.imaging import needs_conversion, open_image, scan_chunks
from fedcxr.metadata import find_metadata_file, read_metadata
from fedcxr.parallel import pmap
from fedcxr.sources import ImageItem, count_images, find_archives, iter_images

MAX_LISTED = 20
CHECK_COLUMNS = (
    "image_index",
    "location",
    "sha256",
    "bytes",
    "chunks",
    "status",
    "reason",
    "width",
    "height",
    "mode",
    "converted_from",
)


class IngestError(ValueError):
    """Too many images are missing, damaged or unmatched; the message names them."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report  # the stage's report, written even when the stage fails


def inspect_image(item: ImageItem) -> dict:
    """Decode one image fully and describe it: hash, size, mode, damage, metadata chunks."""
    record = {"image_index": item.name, "location": item.location}
    try:
        data = item.read()
    except OSError as exc:
        return record | {"status": "unreadable", "reason": str(exc)}
    scan = scan_chunks(data)
    record |= {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "chunks": json.dumps([c.__dict__ for c in scan.chunks], ensure_ascii=False),
    }
    if not scan.is_png:
        return record | {"status": "undecodable", "reason": "not a PNG file (bad signature)"}
    if not scan.complete:
        return record | {
            "status": "truncated",
            "reason": f"PNG ends after {len(data)} bytes, before its IEND chunk",
        }
    try:
        image = open_image(data)
    except (OSError, ValueError, SyntaxError) as exc:
        return record | {"status": "undecodable", "reason": f"decode failed: {exc}"}
    return record | {
        "status": "ok",
        "reason": "",
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
        "converted_from": image.mode if needs_conversion(image.mode) else "",
    }


def _listing(problems: list[dict]) -> str:
    shown = [
        f"  - {p['image_index']} ({p['location'] or 'no file'}): {p['reason']}"
        for p in problems[:MAX_LISTED]
    ]
    more = len(problems) - len(shown)
    return "\n".join(shown + ([f"  ... and {more} more (see the ingest report)"] if more else []))


def ingest(root: Path, cfg: IngestConfig) -> tuple[pd.DataFrame, dict]:
    """Inspect every image and metadata row under root.

    Returns the manifest of usable rows (metadata joined with the image checks, in metadata
    order) and a report listing every problem. Raises IngestError, after building the report
    (attached as `.report`), when problems exceed cfg.max_bad_fraction of the rows.
    """
    if not root.is_dir():
        raise IngestError(f"image source folder not found: {root.resolve()}")
    meta_path = find_metadata_file(root)
    meta, info = read_metadata(meta_path)
    rows = set(meta["image_index"])
    records: dict[str, dict] = {}
    problems: list[dict] = []
    items = iter_images(root, cfg.verify_md5)
    for record in pmap(
        inspect_image, items, total=count_images(root), workers=cfg.workers, desc="ingest"
    ):
        name = record["image_index"]
        if name in records:
            problems.append(
                record
                | {"status": "duplicate", "reason": f"same name as {records[name]['location']}"}
            )
        elif name not in rows:
            problems.append(
                record
                | {"status": "no_metadata_row", "reason": f"image has no row in {meta_path.name}"}
            )
        else:
            records[name] = record
    for name in meta["image_index"]:
        record = records.get(name)
        if record is None:
            problems.append(
                {
                    "image_index": name,
                    "location": "",
                    "status": "missing",
                    "reason": f"row in {meta_path.name} but no image file",
                }
            )
        elif record["status"] != "ok":
            problems.append(record)
    usable = [records[n] for n in meta["image_index"] if records.get(n, {}).get("status") == "ok"]
    checks = pd.DataFrame.from_records(usable, columns=CHECK_COLUMNS)
    checks = checks.astype({"bytes": "int64", "width": "int64", "height": "int64"})
    manifest = meta.merge(checks, on="image_index", how="inner").drop(columns=["status", "reason"])
    problems.sort(key=lambda p: (p["status"], p["image_index"]))
    n_bad = len(problems)
    fraction = n_bad / max(len(meta), 1)
    converted = manifest.loc[manifest["converted_from"] != "", ["image_index", "converted_from"]]
    report = {
        "source": str(root),
        "metadata_file": meta_path.name,
        "metadata_layout": info.layout,
        "archives": [a.name for a in find_archives(root)],
        "md5_checked": cfg.verify_md5,
        "metadata_rows": len(meta),
        "images_found": len(records)
        + sum(p["status"] in ("duplicate", "no_metadata_row") for p in problems),
        "usable": len(manifest),
        "converted_to_gray8": {
            "count": len(converted),
            "by_mode": {
                str(k): int(v)
                for k, v in converted["converted_from"].value_counts().sort_index().items()
            },
            "images": converted["image_index"].tolist(),
        },
        "problems": {
            "count": n_bad,
            "by_kind": {
                k: sum(p["status"] == k for p in problems)
                for k in sorted({p["status"] for p in problems})
            },
            "bad_fraction": round(fraction, 6),
            "max_bad_fraction": cfg.max_bad_fraction,
            "excluded": [
                {k: p.get(k, "") for k in ("image_index", "location", "status", "reason")}
                for p in problems
            ],
        },
        "dimensions": {
            f"{w}x{h}": int(n)
            for (w, h), n in manifest.groupby(["width", "height"]).size().sort_index().items()
        },
    }
    if fraction > cfg.max_bad_fraction:
        raise IngestError(
            f"{n_bad} of {len(meta)} metadata rows/images in {root} have problems "
            f"({fraction:.2%} > ingest.max_bad_fraction={cfg.max_bad_fraction}):\n"
            f"{_listing(problems)}\n"
            "Fix or remove these files, or raise ingest.max_bad_fraction to exclude them.",
            report=report,
        )
    return manifest.reset_index(drop=True), report


def public_summary(report: dict) -> dict:
    """The report without file names (NIH names embed patient IDs): safe to keep in git.

    The full listing stays beside the manifest, in the site's own DVC-managed data.
    """
    summary = json.loads(json.dumps(report))
    summary["converted_to_gray8"].pop("images", None)
    summary["problems"].pop("excluded", None)
    summary["details"] = "data/ingest/details.json (names every converted and excluded file)"
    return summary
