"""De-identification checks and keyed pseudonymization a compliance officer can read."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.config import DeidConfig
from fedcxr.labels import FINDINGS, NIH_IMAGE_NAME
from fedcxr.metadata import NIH_COLUMNS

# Metadata columns that may pass (NIH's schema, canonical names). Anything else is a violation.
ALLOWED_COLUMNS = frozenset(NIH_COLUMNS.values())
# Columns ingest adds about each file; checked here, never passed on.
INGEST_COLUMNS = frozenset(
    {
        "location",
        "sha256",
        "bytes",
        "width",
        "height",
        "mode",
        "converted_from",
        "chunks",
        "raw_age",
    }
    | set(FINDINGS)
)
OUTPUT_COLUMNS = (
    "image_id",
    "patient_id",
    "follow_up",
    "age",
    "sex",
    "view",
    *FINDINGS,
    "manifest_row",
)
DEV_SECRET = b"fedcxr-development-secret-for-the-synthetic-default-only"
SAFE_HARBOR_AGE = 90
MAX_PLAUSIBLE_AGE = 120
MAX_LISTED = 200

_PERSON_KEYWORDS = (
    "name",
    "patient",
    "author",
    "physician",
    "doctor",
    "operator",
    "referring",
    "technologist",
    "radiologist",
)
_PHI_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("person name (DICOM 'Last^First' form)", re.compile(r"\b[A-Za-z'-]+\^[A-Za-z'-]+")),
    ("person name (title)", re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+[A-Z][a-z]+")),
    ("person name ('name:' label)", re.compile(r"\bname\s*[:=]", re.IGNORECASE)),
    ("date", re.compile(r"\b(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b")),
    (
        "date",
        re.compile(
            r"\b(?:0?[1-9]|[12]\d|3[01])[/.-](?:0?[1-9]|[12]\d|3[01])[/.-](?:19|20)?\d{2}\b"
        ),
    ),
    ("date", re.compile(r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b")),
    (
        "date",
        re.compile(
            r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2}"
            r"(?:st|nd|rd|th)?,?\s+(?:19|20)\d{2}\b"
        ),
    ),
    ("social security number", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("record number", re.compile(r"\b(?:MRN|MR#|accession|record|chart)\b", re.IGNORECASE)),
    ("record number (long digit run)", re.compile(r"\b\d{7,}\b")),
    ("phone number", re.compile(r"\(?\b\d{3}\)?[-.\s]\d{3}[-.\s]\d{4}\b")),
    ("e-mail address", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")),
)


class DeidError(ValueError):
    """De-identification violations found with deid.on_violation=fail."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report  # the stage's report, written even when the stage fails


@dataclass(frozen=True)
class Secret:
    key: bytes
    source: str
    development: bool

    @property
    def key_id(self) -> str:
        """Names the key without revealing it (compare runs: same id, same pseudonyms)."""
        return hmac.new(self.key, b"fedcxr-key-id", hashlib.sha256).hexdigest()[:12]


def resolve_secret(
    cfg: DeidConfig, synthetic: bool, environ: dict[str, str] | None = None
) -> Secret:
    """The pseudonymization key: the development key for the synthetic default, else from the
    environment variable cfg.secret_env or the file cfg.secret_file (kept outside git)."""
    if synthetic:
        return Secret(
            DEV_SECRET,
            "fixed development secret (synthetic default only; never use it for real data)",
            development=True,
        )
    environ = dict(os.environ) if environ is None else environ
    if environ.get(cfg.secret_env):
        return Secret(
            environ[cfg.secret_env].encode(),
            f"environment variable {cfg.secret_env}",
            development=False,
        )
    if cfg.secret_file:
        path = Path(cfg.secret_file).expanduser()
        if not path.is_file():
            raise DeidError(f"deid.secret_file {path} does not exist")
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise DeidError(
                f"deid.secret_file {path}: expected at least 16 bytes, found {len(key)}"
            )
        return Secret(key, f"file {path}", development=False)
    raise DeidError(
        f"no pseudonymization secret for real data: set the environment variable "
        f"{cfg.secret_env} (e.g. `export {cfg.secret_env}=$(openssl rand -hex 32)`) or point "
        "deid.secret_file at a file outside git. Keep it: the same secret gives the same "
        "pseudonyms."
    )


def pseudonym(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """Keyed HMAC-SHA256 pseudonym, e.g. 'p3f9c…' for a patient, 'i…' for an image."""
    digest = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return kind[0] + digest[: length - 1]


def phi_reasons(keyword: str, text: str) -> list[str]:
    """Why a metadata chunk's content looks like protected health information."""
    reasons = []
    if text.strip() and any(k in keyword.lower() for k in _PERSON_KEYWORDS):
        reasons.append(f"person name or identifier (keyword {keyword!r})")
    for label, pattern in _PHI_PATTERNS:
        if pattern.search(text) and label not in reasons:
            reasons.append(label)
    return reasons


def _limited(items: list, total: int | None = None) -> dict:
    total = len(items) if total is None else total
    return {"count": total, "listed": items[:MAX_LISTED], "more": max(0, total - MAX_LISTED)}


def deidentify(
    manifest: pd.DataFrame, cfg: DeidConfig, secret: Secret
) -> tuple[pd.DataFrame, dict]:
    """Check the manifest, pseudonymize it and return (clean metadata, report).

    Raises DeidError (with `.report`) when violations remain and cfg.on_violation is 'fail'.
    """
    scrub = cfg.on_violation == "scrub"
    df = manifest.reset_index(drop=True)
    df["image_id"] = [pseudonym(secret.key, "image", v) for v in df["image_index"]]
    df["pseudo_patient"] = [pseudonym(secret.key, "patient", str(v)) for v in df["patient_id"]]
    actions: list[str] = []
    violations = 0

    # 1. Columns against the allow-list.
    metadata_columns = [c for c in manifest.columns if c not in INGEST_COLUMNS]
    extra = [c for c in metadata_columns if c not in ALLOWED_COLUMNS]
    violations += len(extra)
    if extra and scrub:
        actions.append(f"dropped column(s) {extra}")
    columns = {
        "looked_at": metadata_columns,
        "allowed": sorted(ALLOWED_COLUMNS),
        "violations": [{"column": c, "why": "not on the allow-list"} for c in extra],
    }

    # 2. Patient IDs -> keyed pseudonyms.
    n_patients = df["patient_id"].nunique()
    collisions = n_patients - df["pseudo_patient"].nunique()
    patient_ids = {
        "looked_at": len(df),
        "patients": int(n_patients),
        "method": "HMAC-SHA256, 16 characters",
        "secret": secret.source,
        "secret_id": secret.key_id,
        "development_secret": secret.development,
        "collisions": int(collisions),
        "note": "image ids are pseudonyms too: NIH file names embed the patient ID",
    }
    if collisions:
        raise DeidError(f"{collisions} pseudonym collisions; use a longer pseudonym")

    # 3. Ages: Safe Harbor caps ages over 89; impossible ages are flagged.
    age = df["age"].astype(float)
    over = age > cfg.max_age
    impossible = age.isna() | (age < 0) | (age > MAX_PLAUSIBLE_AGE)
    ages = {
        "looked_at": len(df),
        "over_limit": {
            "rule": f"ages over {cfg.max_age} reported as {SAFE_HARBOR_AGE} (HIPAA Safe Harbor)",
            **_limited(
                [
                    {"image_id": i, "reported_age": SAFE_HARBOR_AGE}
                    for i in df.loc[over & ~impossible, "image_id"]
                ]
            ),
        },
        "impossible": {
            "rule": f"missing, negative or over {MAX_PLAUSIBLE_AGE}",
            "action": "set to missing" if scrub else "flagged (kept as missing in the output)",
            **_limited(
                [
                    {"image_id": i, "value": str(v)}
                    for i, v in df.loc[impossible, ["image_id", "raw_age"]].itertuples(index=False)
                ]
                if "raw_age" in df
                else []
            ),
        },
    }
    df["age"] = np.where(impossible, np.nan, np.where(over, SAFE_HARBOR_AGE, age))
    if over.any():
        actions.append(f"capped {int((over & ~impossible).sum())} ages at {SAFE_HARBOR_AGE}")

    # 4. PNG metadata chunks.
    chunk_rows, by_type, chunk_violations = 0, {}, []
    chunk_column = df["chunks"] if "chunks" in df else pd.Series("", index=df.index)
    for image_id, raw in zip(df["image_id"], chunk_column, strict=True):
        chunks = json.loads(raw) if isinstance(raw, str) and raw else []
        chunk_rows += bool(chunks)
        for chunk in chunks:
            by_type[chunk["type"]] = by_type.get(chunk["type"], 0) + 1
            reasons = phi_reasons(chunk["keyword"], chunk["text"])
            if chunk["type"] == "tIME":
                reasons.append("date (tIME: last-modification time)")
            if chunk["type"] == "eXIf":
                reasons.append("EXIF block (may hold dates, device serials, names)")
            if reasons:
                chunk_violations.append(
                    {
                        "image_id": image_id,
                        "chunk": chunk["type"],
                        "keyword": chunk["keyword"],
                        "looks_like": reasons,
                        "content": f"<redacted, {len(chunk['text'])} chars>",
                    }
                )
    violations += len(chunk_violations)
    png_chunks = {
        "looked_at": len(df),
        "types_checked": ["tEXt", "zTXt", "iTXt", "eXIf", "tIME"],
        "images_with_chunks": chunk_rows,
        "by_type": dict(sorted(by_type.items())),
        "violations": _limited(chunk_violations),
        "note": "every chunk is dropped downstream: resize keeps decoded pixels only",
    }
    if chunk_violations and scrub:
        actions.append(f"removed {len(chunk_violations)} PHI-bearing PNG chunk(s)")

    # 5. File names.
    bad_names = [
        i
        for i, n in df[["image_id", "image_index"]].itertuples(index=False)
        if not NIH_IMAGE_NAME.match(n)
    ]
    violations += len(bad_names)
    file_names = {
        "looked_at": len(df),
        "pattern": NIH_IMAGE_NAME.pattern,
        "violations": _limited(
            [
                {
                    "image_id": i,
                    "why": "name does not follow the NIH pattern (it may carry identifiers)",
                }
                for i in bad_names
            ]
        ),
    }
    if bad_names and scrub:
        actions.append(f"replaced {len(bad_names)} non-NIH file name(s) by pseudonyms")

    clean = df.assign(patient_id=df["pseudo_patient"], manifest_row=np.arange(len(df)))
    clean = clean.loc[:, list(OUTPUT_COLUMNS)]
    passed = violations == 0
    report = {
        "on_violation": cfg.on_violation,
        "images": len(df),
        "passed": passed,
        "violations": violations,
        "scrubbed": scrub and not passed,
        "actions": actions,
        "checks": {
            "columns": columns,
            "patient_ids": patient_ids,
            "ages": ages,
            "png_chunks": png_chunks,
            "file_names": file_names,
        },
        "output_columns": list(OUTPUT_COLUMNS),
    }
    if not passed and not scrub:
        raise DeidError(
            f"{violations} de-identification violation(s): {len(extra)} column(s) "
            f"off the allow-list {extra}, {len(chunk_violations)} PHI-looking PNG chunk(s), "
            f"{len(bad_names)} non-NIH file name(s). See the de-identification report; set "
            "deid.on_violation: scrub to remove them.",
            report=report,
        )
    return clean, report
