"""The seed paper's published numbers: the only hand-typed figures in the report, with sources.

Source: Saqib et al., "Privacy Preserved and Practical Implementation for Distributed Machine
Learning in Radiology", Preprints 2025, doi:10.20944/preprints202503.0962.v1 (the project copy
is /work/shared/seed-paper.md). Each value names its table and row. Values are kept exactly as
published (percent, hours, GB); `PaperStat.fraction` converts percent for side-by-side display.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = (
    "Saqib et al., Privacy Preserved and Practical Implementation for Distributed Machine "
    "Learning in Radiology, Preprints 2025, doi:10.20944/preprints202503.0962.v1"
)


@dataclass(frozen=True)
class PaperStat:
    """One published cell: mean ± sd in `unit` ('%', '' for a plain number, 'h', 'GB')."""

    mean: float
    sd: float | None
    unit: str
    source: str  # e.g. "Table 1, Federated Multi-Node, AUC (%)"

    def fraction(self) -> tuple[float, float | None]:
        """(mean, sd) on a 0-1 scale for percent values; unchanged otherwise."""
        if self.unit == "%":
            return self.mean / 100.0, None if self.sd is None else self.sd / 100.0
        return self.mean, self.sd


@dataclass(frozen=True)
class PaperText:
    """A published cell that is not a number with a spread (e.g. "~150", "10–20", "N/A")."""

    text: str
    unit: str
    source: str


# Paper configuration names -> fedcxr configuration names (metrics.json keys).
PAPER_CONFIGS: dict[str, str] = {
    "single_node": "Single-Node Baseline",
    "centralized": "Centralized Multi-Node",
    "federated": "Federated Multi-Node",
}


def _source(table: str, config: str, column: str) -> str:
    """Where a cell stands in the paper: "<table>, <row>, <column>"."""
    return f"{table}, {PAPER_CONFIGS[config]}, {column}"


# The performance tables' columns: metric (metrics.json key) -> (unit, the paper's heading).
_COLUMNS: dict[str, tuple[str, str]] = {
    "auroc_macro": ("%", "AUC (%)"),
    "accuracy": ("%", "Acc. (%)"),
    "f1": ("", "F1"),
    "precision": ("%", "Prec. (%)"),
    "recall": ("%", "Rec. (%)"),
    "sensitivity_pneumonia": ("%", "Sens. (%)"),
    "specificity_pneumonia": ("%", "Spec. (%)"),
}


def _stats(
    table: str, metrics: tuple[str, ...], rows: dict[str, tuple[tuple[float, float], ...]]
) -> dict[str, dict[str, PaperStat]]:
    """config -> metric -> cell, from each configuration's (mean, sd) per metric, in order."""
    return {
        config: {
            key: PaperStat(mean, sd, _COLUMNS[key][0], _source(table, config, _COLUMNS[key][1]))
            for key, (mean, sd) in zip(metrics, values, strict=True)
        }
        for config, values in rows.items()
    }


# Table 1: Multi-Label (14 Diseases) Results on Test Set (section 5.2.1).
TABLE1: dict[str, dict[str, PaperStat]] = _stats(
    "Table 1",
    ("auroc_macro", "accuracy", "f1", "precision", "recall"),
    {
        "single_node": ((81.2, 0.5), (78.9, 0.4), (0.77, 0.03), (80.1, 0.5), (74.6, 0.6)),
        "centralized": ((82.5, 0.4), (80.2, 0.5), (0.78, 0.03), (81.3, 0.4), (75.9, 0.5)),
        "federated": ((83.7, 0.6), (81.1, 0.3), (0.79, 0.02), (82.1, 0.5), (76.5, 0.4)),
    },
)

# Table 2: Binary Pneumonia Detection Results (section 5.2.2). Sens./Spec. are the
# pneumonia sensitivity and specificity; the paper gives no F1, precision or recall here.
TABLE2: dict[str, dict[str, PaperStat]] = _stats(
    "Table 2",
    ("auroc_macro", "accuracy", "sensitivity_pneumonia", "specificity_pneumonia"),
    {
        "single_node": ((86.9, 0.3), (85.2, 0.5), (88.3, 0.4), (84.1, 0.6)),
        "centralized": ((88.1, 0.4), (86.4, 0.4), (89.2, 0.5), (85.0, 0.5)),
        "federated": ((89.4, 0.5), (87.1, 0.6), (90.1, 0.6), (85.8, 0.5)),
    },
)

# Table 3: Training Time per Epoch and Network Overhead (section 5.3): per configuration,
# Time/Epoch (h) as mean, sd and Comm. Overhead (GB) as published text.
TABLE3: dict[str, dict[str, PaperStat | PaperText]] = {
    config: {
        "time_per_epoch": PaperStat(mean, sd, "h", _source("Table 3", config, "Time/Epoch")),
        "comm": PaperText(comm, "GB", _source("Table 3", config, "Comm. Overhead (GB)")),
    }
    for config, (mean, sd, comm) in {
        "single_node": (8.5, 0.4, "N/A"),
        "centralized": (5.2, 0.3, "~150"),
        "federated": (5.8, 0.4, "10–20"),
    }.items()
}

# Tables by fedcxr task name: the paper's multi-label table and its pneumonia table.
PERFORMANCE: dict[str, dict[str, dict[str, PaperStat]]] = {
    "multilabel": TABLE1,
    "pneumonia": TABLE2,
}

# Claims made in the text (percentage points of AUC), as ranges.
CLAIMED_GAIN_VS_SINGLE_NODE: dict[str, tuple[float, float, str]] = {
    "multilabel": (1.2, 1.5, "Section 5.2.2"),
    "pneumonia": (1.3, 2.5, "Section 5.2.2"),
}
# The headline claim of federated over single-node training, in AUC points: the abstract,
# Section 1 ("enhances the AUC by 1.5-2.0%") and Section 6.1 ("An AUC increase of 1.5-2.0%").
CLAIMED_GAIN_HEADLINE: tuple[float, float, str] = (1.5, 2.0, "Abstract; Sections 1 and 6.1")
DP_AUC_DROP_POINTS: tuple[float, float, str] = (1.0, 1.2, "Section 5.4")
DP_NOISE_MULTIPLIER = 1.0  # Section 4.5 / 5.4

# The study's set-up (sections 3.2-4.4 and 5.1).
NIH_IMAGES = 112_120  # Section 2.4 / 5.1
TEST_IMAGES = 10_120  # Section 3.6 / 5.1
IMAGE_SIZE = 512  # Section 3.3, downsampled to 512 x 512
ARCHS: tuple[str, ...] = ("resnet50", "densenet121")  # Section 3.4
ROUNDS: tuple[int, int] = (20, 30)  # Section 4.4, step 6
LOCAL_EPOCHS: tuple[int, int] = (2, 5)  # Section 3.4
BATCH_SIZE = 32  # Section 3.4, "a batch size of 32"
REPEATS: tuple[int, int] = (3, 5)  # Section 3.6, "repeat experiments 3-5 times"
