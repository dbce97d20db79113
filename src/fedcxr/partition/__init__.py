"""Patient-disjoint splitting into a held-out test set and simulated hospital sites."""

from fedcxr.partition.plan import SplitPlan, fill_exact, patient_table, plan_split
from fedcxr.partition.report import (
    AGE_BANDS,
    check_disjoint,
    describe_set,
    patient_overlap,
    prevalence_table,
    split_report,
)
from fedcxr.partition.scorers import (
    DEMOGRAPHIC_PROFILES,
    PARTITIONERS,
    Scorer,
    demographic_scores,
    dirichlet_scores,
    iid_scores,
    register,
)
from fedcxr.partition.sizes import (
    FULL_SCALE_IMAGES,
    TEST,
    UNUSED,
    PartitionError,
    SizeFit,
    fit_sizes,
    scale_targets,
    site_names,
)

__all__ = [
    "AGE_BANDS",
    "DEMOGRAPHIC_PROFILES",
    "FULL_SCALE_IMAGES",
    "PARTITIONERS",
    "TEST",
    "UNUSED",
    "PartitionError",
    "Scorer",
    "SizeFit",
    "SplitPlan",
    "check_disjoint",
    "demographic_scores",
    "describe_set",
    "dirichlet_scores",
    "fill_exact",
    "fit_sizes",
    "iid_scores",
    "patient_overlap",
    "patient_table",
    "plan_split",
    "prevalence_table",
    "register",
    "scale_targets",
    "site_names",
    "split_report",
]
