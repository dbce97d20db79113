"""Spotting PHI in metadata text: PNG chunk keywords and content, and raw ages fit to show."""

from __future__ import annotations

import re

# Raw ages shown in reports: short plain numbers only; anything else may be text typed into the
# age column (a date of birth, a name) and is withheld.
_SHOWN_AGE = re.compile(r"-?\d{1,4}(?:\.\d{1,2})?\s*[YMWDymwd]?")
AGE_WITHHELD = "<withheld>"
AGE_MISSING = "<missing>"

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
# Words of PNG text-chunk keywords that are kept in the manifest and reports as written (the
# PNG specification's registered keywords, common tools' and DICOM-style attribute names). A
# keyword with any other word may itself carry a name or number and is withheld.
_KEYWORD_VOCABULARY = """
    title author description copyright creation time software disclaimer warning source comment
    comments xml com adobe xmp raw profile type exif iptc app icc date create modify timestamp
    parameters label labels image index view position patient name names id sex gender age birth
    physician physicians doctor operator operators referring technologist radiologist study series
    institution modality station accession number body part window center width level
    manufacturer model device serial pixel spacing bits orientation notes note keywords caption
    uid instance sop class protocol acquisition content requesting performing performed procedure
    report finding findings text data version format dicom png photometric interpretation rows
    columns rescale slope intercept units unit resolution dpi of by the
"""
_KEYWORD_WORDS = frozenset(_KEYWORD_VOCABULARY.split())
_KEYWORD_CHARS = re.compile(r"[A-Za-z0-9 :._-]{1,79}")
_KEYWORD_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
KEYWORD_WITHHELD = "<withheld keyword>"
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


def phi_reasons(keyword: str, text: str) -> list[str]:
    """Why a metadata chunk's content looks like protected health information (category names
    only: a reason never quotes the content or the keyword)."""
    reasons = []
    if text.strip() and any(k in keyword.lower() for k in _PERSON_KEYWORDS):
        reasons.append("person name or identifier (keyword names a person or patient)")
    for label, pattern in _PHI_PATTERNS:
        if pattern.search(text) and label not in reasons:
            reasons.append(label)
    return reasons


def chunk_reasons(ctype: str, keyword: str, text: str) -> list[str]:
    """phi_reasons of a PNG metadata chunk, its keyword searched too, plus its type's risk."""
    reasons = phi_reasons(keyword, text)
    for label in phi_reasons("", keyword):
        if label not in reasons:
            reasons.append(f"{label} (in the keyword)")
    if ctype == "tIME":
        reasons.append("date (tIME: last-modification time)")
    if ctype == "eXIf":
        reasons.append("EXIF block (may hold dates, device serials, names)")
    return reasons


def safe_keyword(keyword: str) -> str:
    """The keyword if it is made of known words only (e.g. 'Author', 'PatientName'), else a
    placeholder: an unknown keyword may itself carry a name or a record number."""
    if not keyword:
        return ""  # eXIf and tIME chunks have none
    words = _KEYWORD_WORD.findall(keyword)
    known = all(w.lower() in _KEYWORD_WORDS or (w.isdigit() and len(w) <= 2) for w in words)
    return keyword if _KEYWORD_CHARS.fullmatch(keyword) and words and known else KEYWORD_WITHHELD


def shown_age(raw: str) -> str:
    """A raw age as reports may show it: a short plain number, else a placeholder."""
    value = str(raw).strip()
    if not value:
        return AGE_MISSING
    if value in (AGE_MISSING, AGE_WITHHELD) or _SHOWN_AGE.fullmatch(value):
        return value
    return AGE_WITHHELD
