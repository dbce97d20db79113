"""Checks and hashes every image of an NIH-format folder against its metadata into a manifest."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from functools import partial
from pathlib import Path

import pandas as pd

from fedcxr.config import IngestConfig
from fedcxr.deid import chunk_reasons, derived_key, safe_keyword, shown_age
from fedcxr.imaging import PngChunk, needs_conversion, open_image, scan_chunks
from fedcxr.labels import NIH_IMAGE_NAME
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
HASH_PURPOSE = "ingest: PNG metadata chunks and withheld file names"
HASH_METHOD = (
    "HMAC-SHA256 (16 hex digits) under a key derived from the pseudonymization secret, "
    "which is never stored"
)
NON_NIH_WHY = (
    "file name does not follow the NIH pattern 00000000_000.png; withheld, as it may carry "
    "identifiers (rename the file and its 'Image Index')"
)


class IngestError(ValueError):
    """Too many images are missing, damaged or unmatched; the message names them."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report  # the stage's report, written even when the stage fails


def keyed_hash(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of data, 16 hex digits: equal data, equal hash; no offline guessing."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:16]


def describe_chunk(chunk: PngChunk, key: bytes) -> dict:
    """What the de-identification checks need of a metadata chunk, never its content: type,
    keyword (when made of known words), stored length, PHI categories and a keyed hash."""
    reasons = chunk_reasons(chunk.type, chunk.keyword, chunk.text)
    return {
        "type": chunk.type,
        "keyword": safe_keyword(chunk.keyword),
        "length": len(chunk.data),
        "phi": bool(reasons),
        "looks_like": reasons,
        "hmac": keyed_hash(key, chunk.type.encode("latin-1") + b"\0" + chunk.data),
    }


def withheld_name(key: bytes, name: str) -> str:
    """A stand-in for a file name that may carry identifiers (same name, same stand-in)."""
    return "name-" + keyed_hash(key, f"file name:{name}".encode("utf-8", "surrogateescape"))


def inspect_image(item: ImageItem, key: bytes) -> dict:
    """Decode one image fully and describe it: hash, size, mode, damage, metadata chunks
    (described by describe_chunk under key)."""
    record = {"image_index": item.name, "location": item.location}
    try:
        data = item.read()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        return record | {"status": "unreadable", "reason": f"cannot read the file: {why}"}
    scan = scan_chunks(data)
    record |= {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "chunks": json.dumps([describe_chunk(c, key) for c in scan.chunks]),
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


def _without_phi_values(meta: pd.DataFrame, extra: tuple[str, ...], where: str) -> pd.DataFrame:
    """Metadata with the values of off-schema columns emptied (deid flags the columns by name)
    and raw ages that are not short plain numbers withheld."""
    clash = sorted(set(extra) & set(CHECK_COLUMNS))
    if clash:
        raise IngestError(
            f"{where}: column(s) {clash} clash with the columns ingest adds; expected NIH's "
            "columns only. Rename or remove them."
        )
    return meta.assign(**{c: "" for c in extra}, raw_age=meta["raw_age"].map(shown_age))


def ingest(root: Path, cfg: IngestConfig, key: bytes | None = None) -> tuple[pd.DataFrame, dict]:
    """Inspect every image and metadata row under root.

    Returns the manifest of usable rows (metadata joined with the image checks, in metadata
    order) and a report listing every problem. Raises IngestError, after building the report
    (attached as `.report`), when problems exceed cfg.max_bad_fraction of the rows.

    No PHI is copied: PNG metadata chunks are described, never quoted (describe_chunk); the
    values of columns outside NIH's schema are emptied; a file name that does not follow the
    NIH pattern is a problem listed under a keyed stand-in (withheld_name). `key` is the
    pseudonymization secret that keyed hashes derive from (so outputs are reproducible); None
    draws a random one (hashes then compare within this call only).
    """
    if not root.is_dir():
        raise IngestError(f"image source folder not found: {root.resolve()}")
    hash_key = derived_key(secrets.token_bytes(32) if key is None else key, HASH_PURPOSE)
    meta_path = find_metadata_file(root)
    meta, info = read_metadata(meta_path)
    meta = _without_phi_values(meta, info.extra_columns, str(meta_path))
    rows = set(meta["image_index"])
    records: dict[str, dict] = {}
    problems: list[dict] = []
    withheld: dict[str, dict] = {}  # one problem per non-NIH name, file or row
    withheld_files = 0

    def withhold(name: str) -> None:
        stand_in = withheld_name(hash_key, name)
        withheld.setdefault(
            name,
            {
                "image_index": stand_in,
                "location": "<withheld>",
                "status": "non_nih_name",
                "reason": NON_NIH_WHY,
            },
        )

    items = iter_images(root, cfg.verify_md5)
    for record in pmap(
        partial(inspect_image, key=hash_key),
        items,
        total=count_images(root),
        workers=cfg.workers,
        desc="ingest",
    ):
        name = record["image_index"]
        if not NIH_IMAGE_NAME.match(name):
            withhold(name)
            withheld_files += 1
        elif name in records:
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
        if not NIH_IMAGE_NAME.match(name):
            withhold(name)
        elif record is None:
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
    problems += withheld.values()
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
        "withheld": {
            "columns_emptied": list(info.extra_columns),
            "non_nih_names": len(withheld),
            "png_chunks": "described by type, keyword, length, PHI categories and keyed hash",
            "hashes": HASH_METHOD,
        },
        "images_found": len(records)
        + withheld_files
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
