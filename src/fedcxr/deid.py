"""De-identification checks and keyed pseudonymization a compliance officer can read."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.config import DeidConfig
from fedcxr.labels import FINDINGS, NIH_IMAGE_NAME
from fedcxr.metadata import NIH_COLUMNS
from fedcxr.phiscan import chunk_reasons, safe_keyword, shown_age

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
MIN_KEY_BYTES = 32
MAKE_KEY = "openssl rand -hex 32"
SAFE_HARBOR_AGE = 90
MAX_PLAUSIBLE_AGE = 120
MAX_LISTED = 200
_HEX = re.compile(r"[0-9a-fA-F]+")


class DeidError(ValueError):
    """De-identification violations found with deid.on_violation=fail."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report  # the stage's report, written even when the stage fails


@dataclass(frozen=True)
class Secret:
    """The pseudonymization key and where it came from (the key itself is never shown)."""

    key: bytes = field(repr=False)
    source: str
    development: bool


def key_material(raw: bytes, where: str) -> bytes:
    """raw (surrounding whitespace stripped) after checking that it is a strong key.

    Text must be at least 64 hexadecimal digits (32 random bytes, as `openssl rand -hex 32`
    prints); a passphrase is refused however long. Anything that is not printable text is taken
    as binary key material and needs at least 32 bytes. The key is used as given (hex is not
    decoded), so a key made as the README says keeps its pseudonyms.
    """
    value = raw.strip()
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        is_hex = _HEX.fullmatch(text) is not None
        if is_hex and len(text) >= 2 * MIN_KEY_BYTES:
            return value
        found = (
            f"{len(text)} hexadecimal digits"
            if is_hex
            else f"{len(text)} characters of text that is not hexadecimal (a passphrase)"
        )
    elif len(value) >= MIN_KEY_BYTES:
        return value
    else:
        found = f"{len(value)} bytes of binary data"
    raise DeidError(
        f"{where}: expected a random key of at least {MIN_KEY_BYTES} bytes, written as at least "
        f"{2 * MIN_KEY_BYTES} hexadecimal digits (or a binary file of {MIN_KEY_BYTES}+ bytes); "
        f"found {found}. Make one with `{MAKE_KEY}` and keep it outside git: the same key "
        "gives the same pseudonyms."
    )


def resolve_secret(
    cfg: DeidConfig, synthetic: bool, environ: dict[str, str] | None = None
) -> Secret:
    """The pseudonymization key: the development key for the synthetic default, else from the
    environment variable cfg.secret_env or the file cfg.secret_file (kept outside git), checked
    by key_material."""
    if synthetic:
        return Secret(
            DEV_SECRET,
            "fixed development secret (synthetic default only; never use it for real data)",
            development=True,
        )
    environ = dict(os.environ) if environ is None else environ
    if environ.get(cfg.secret_env):
        where = f"environment variable {cfg.secret_env}"
        raw = environ[cfg.secret_env].encode("utf-8", "surrogateescape")
        return Secret(key_material(raw, where), where, development=False)
    if cfg.secret_file:
        path = Path(cfg.secret_file).expanduser()
        if not path.is_file():
            raise DeidError(f"deid.secret_file {path} does not exist")
        where = f"file {path}"
        return Secret(key_material(path.read_bytes(), f"deid.secret_file {path}"), where, False)
    raise DeidError(
        f"no pseudonymization secret for real data: set the environment variable "
        f"{cfg.secret_env} (e.g. `export {cfg.secret_env}=$({MAKE_KEY})`) or point "
        "deid.secret_file at a file outside git. Keep it: the same secret gives the same "
        "pseudonyms."
    )


def derived_key(key: bytes, purpose: str) -> bytes:
    """A key for one purpose, derived from the pseudonymization key (HMAC-SHA256)."""
    return hmac.new(key, f"fedcxr derived key: {purpose}".encode(), hashlib.sha256).digest()


def pseudonym(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """Keyed HMAC-SHA256 pseudonym, e.g. 'p3f9c…' for a patient, 'i…' for an image."""
    digest = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return kind[0] + digest[: length - 1]


def _limited(items: list, total: int | None = None) -> dict:
    total = len(items) if total is None else total
    return {"count": total, "listed": items[:MAX_LISTED], "more": max(0, total - MAX_LISTED)}


def _age_check(df: pd.DataFrame, max_age: int, scrub: bool) -> tuple[dict, pd.Series, pd.Series]:
    """Safe Harbor caps ages over max_age; impossible ages (missing, negative, > 120) are flagged
    and set to missing. Returns the report section and the (over, impossible) masks."""
    age = df["age"].astype(float)
    over = age > max_age
    impossible = age.isna() | (age < 0) | (age > MAX_PLAUSIBLE_AGE)
    raw = df["raw_age"] if "raw_age" in df else age.map(lambda v: "" if np.isnan(v) else f"{v:g}")
    section = {
        "looked_at": len(df),
        "over_limit": {
            "rule": f"ages over {max_age} reported as {SAFE_HARBOR_AGE} (HIPAA Safe Harbor)",
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
            "shown": "raw values that are not short plain numbers are withheld",
            **_limited(
                [
                    {"image_id": i, "value": shown_age(v)}
                    for i, v in zip(df.loc[impossible, "image_id"], raw[impossible], strict=True)
                ]
            ),
        },
    }
    return section, over & ~impossible, impossible


def _chunk_check(image_ids: pd.Series, chunk_column: pd.Series) -> dict:
    """PNG metadata chunks as ingest described them (type, keyword, length, PHI categories)."""
    images_with_chunks, by_type, found = 0, {}, []
    for image_id, raw in zip(image_ids, chunk_column, strict=True):
        chunks = json.loads(raw) if isinstance(raw, str) and raw else []
        images_with_chunks += bool(chunks)
        for chunk in chunks:
            if "text" in chunk:
                raise DeidError(
                    "the ingest manifest holds the text of PNG metadata chunks: it was made by "
                    "an older ingest. Expected only type, keyword, length, PHI categories and a "
                    "keyed hash. Re-run ingest (`dvc repro ingest`), then remove the old "
                    "manifest from the DVC cache and any remote (`dvc gc -w`, `dvc gc -w -c`)."
                )
            ctype = chunk["type"]
            by_type[ctype] = by_type.get(ctype, 0) + 1
            reasons = list(chunk.get("looks_like") or [])
            reasons += [r for r in chunk_reasons(ctype, "", "") if r not in reasons]
            if reasons or chunk.get("phi"):
                found.append(
                    {
                        "image_id": image_id,
                        "chunk": ctype,
                        "keyword": safe_keyword(chunk.get("keyword", "")),
                        "looks_like": reasons or ["flagged by ingest"],
                        "content": f"<redacted, {int(chunk.get('length', 0))} bytes>",
                    }
                )
    return {
        "looked_at": len(image_ids),
        "types_checked": ["tEXt", "zTXt", "iTXt", "eXIf", "tIME"],
        "images_with_chunks": images_with_chunks,
        "by_type": dict(sorted(by_type.items())),
        "violations": _limited(found),
        "recorded": "type, keyword, length, PHI categories and a keyed hash; never the content",
        "note": "every chunk is dropped downstream: resize keeps decoded pixels only",
    }


def deidentify(
    manifest: pd.DataFrame, cfg: DeidConfig, secret: Secret
) -> tuple[pd.DataFrame, dict]:
    """Check the manifest, pseudonymize it and return (clean metadata, report).

    Values of columns off the allow-list are never copied: the output has OUTPUT_COLUMNS only,
    the report names columns, counts and pseudonyms. Raises DeidError (with `.report`) when
    violations remain and cfg.on_violation is 'fail'.
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

    # 2. Patient IDs -> keyed pseudonyms. Nothing else derived from the key is reported.
    n_patients = df["patient_id"].nunique()
    collisions = n_patients - df["pseudo_patient"].nunique()
    patient_ids = {
        "looked_at": len(df),
        "patients": int(n_patients),
        "method": "HMAC-SHA256, 16 characters",
        "secret": secret.source,
        "development_secret": secret.development,
        "collisions": int(collisions),
        "note": "image ids are pseudonyms too: NIH file names embed the patient ID",
    }
    if collisions:
        raise DeidError(f"{collisions} pseudonym collisions; use a longer pseudonym")

    # 3. Ages.
    ages, capped, impossible = _age_check(df, cfg.max_age, scrub)
    df["age"] = np.where(
        impossible, np.nan, np.where(capped, SAFE_HARBOR_AGE, df["age"].astype(float))
    )
    if capped.any():
        actions.append(f"capped {int(capped.sum())} ages at {SAFE_HARBOR_AGE}")
    warnings = []
    if impossible.any():
        shown = [v["value"] for v in ages["impossible"]["listed"][:5]]
        more = ", ..." if int(impossible.sum()) > len(shown) else ""
        warnings.append(
            {
                "check": "ages.impossible",
                "count": int(impossible.sum()),
                "message": f"{int(impossible.sum())} impossible age(s) "
                f"({ages['impossible']['rule']}): {', '.join(shown)}{more}; set to missing",
            }
        )

    # 4. PNG metadata chunks.
    chunk_column = df["chunks"] if "chunks" in df else pd.Series("", index=df.index)
    png_chunks = _chunk_check(df["image_id"], chunk_column)
    n_chunks = png_chunks["violations"]["count"]
    violations += n_chunks
    if n_chunks and scrub:
        actions.append(f"removed {n_chunks} PHI-bearing PNG chunk(s)")

    # 5. File names (ingest withholds non-NIH names; this catches manifests made otherwise).
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
        "warnings": {"count": sum(w["count"] for w in warnings), "listed": warnings},
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
            f"off the allow-list {extra}, {n_chunks} PHI-looking PNG chunk(s), "
            f"{len(bad_names)} non-NIH file name(s). See the de-identification report; set "
            "deid.on_violation: scrub to remove them.",
            report=report,
        )
    return clean, report
