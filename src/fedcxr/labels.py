"""The NIH ChestX-ray14 finding names and file-name conventions shared by every stage."""

from __future__ import annotations

import re

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"

# NIH's BBox_List_2017 spells one finding differently from Data_Entry_2017.
BBOX_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}

NIH_IMAGE_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")


def parse_finding_labels(text: str) -> tuple[str, ...]:
    """Split NIH's 'A|B' finding string into known findings; 'No Finding' gives ()."""
    parts = [p.strip() for p in str(text).split("|") if p.strip()]
    unknown = [p for p in parts if p not in FINDINGS and p != NO_FINDING]
    if unknown:
        raise ValueError(
            f"unknown finding label(s) {unknown!r} in {text!r}; expected any of "
            f"{', '.join(FINDINGS)} or {NO_FINDING!r}"
        )
    return tuple(p for p in parts if p != NO_FINDING)
