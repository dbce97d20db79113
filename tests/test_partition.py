"""Patient-disjoint splitting: exact sizes at full scale, strategies that differ as designed."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.config import PartitionConfig
from fedcxr.labels import FINDINGS
from fedcxr.metadata import embedded_metadata_path, read_metadata
from fedcxr.partition import (
    PARTITIONERS,
    PartitionError,
    check_disjoint,
    fill_exact,
    plan_split,
    scale_targets,
    split_report,
)

FULL_SIZES = {
    "test": 10120,
    "site-a": 20000,
    "site-b": 25000,
    "site-c": 15000,
    "site-d": 30000,
    "site-e": 12000,
}


@pytest.fixture(scope="module")
def full_meta() -> pd.DataFrame:
    meta, info = read_metadata(embedded_metadata_path())
    assert info.rows == 112120
    return meta


@pytest.fixture(scope="module")
def reports(full_meta):
    out = {}
    for name in sorted(PARTITIONERS):
        cfg = PartitionConfig(strategy=name, dirichlet_alpha=0.3)
        plan = plan_split(full_meta, cfg, seed=42)
        out[name] = (plan, split_report(full_meta, plan, cfg, 42))
    return out


def test_scale_targets_exact_when_sizes_add_up_and_proportional_otherwise():
    assert scale_targets(112120, 10120, (20000, 25000, 15000, 30000, 12000)) == [
        10120,
        20000,
        25000,
        15000,
        30000,
        12000,
    ]
    scaled = scale_targets(2500, 10120, (20000, 25000, 15000, 30000, 12000))
    assert sum(scaled) == 2500
    # floors 225,445,557,334,668,267 (+4 by largest remainder: .95 .93 .65 .57)
    assert scaled == [226, 446, 557, 334, 669, 268]


def test_fill_exact_hits_capacities_with_whole_patients():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 8, size=400)
    sizes[:120] = 1
    caps = [int(sizes.sum()) // 3, int(sizes.sum()) // 3]
    caps.append(int(sizes.sum()) - sum(caps))
    out = fill_exact(sizes, rng.gumbel(size=(400, 3)), caps, rng)
    assert [int(sizes[out == k].sum()) for k in range(3)] == caps


@pytest.mark.parametrize("strategy", sorted(PARTITIONERS))
def test_full_scale_split_is_exact_and_patient_disjoint(reports, full_meta, strategy):
    plan, report = reports[strategy]
    assert {n: e["images"] for n, e in report["sets"].items()} == FULL_SIZES
    assert report["exact_sizes"] is True
    # Recompute the overlap from the assignment itself, not from the report.
    set_of = plan.set_of()
    owners = pd.Series(set_of).groupby(full_meta["patient_id"].to_numpy()).nunique()
    assert int(owners.max()) == 1
    assert report["patient_overlap_total"] == 0
    for name in FULL_SIZES:
        if name == "test":
            continue
        site = report["sets"][name]
        assert site["train_val_patient_overlap"] == 0
        assert site["val"]["images"] == round(0.1 * FULL_SIZES[name])


def test_demographic_sites_differ_by_age_sex_and_view(reports):
    sets = reports["demographic"][1]["sets"]

    def share(name, key, value):
        counts = sets[name][key]
        return counts.get(value, 0) / sum(counts.values())

    assert sets["site-b"]["age"]["mean"] > sets["site-a"]["age"]["mean"] + 10
    assert share("site-c", "sex", "F") > 0.8 > share("site-d", "sex", "F")
    assert share("site-b", "view", "AP") > share("site-a", "view", "AP") + 0.2
    # The iid split keeps sites alike on the same measures.
    iid = reports["iid"][1]["sets"]
    ages = [iid[n]["age"]["mean"] for n in FULL_SIZES if n != "test"]
    assert max(ages) - min(ages) < 3


def test_dirichlet_skews_labels_more_than_iid(reports):
    def spread(strategy):
        sets = reports[strategy][1]["sets"]
        prev = np.array(
            [[sets[n]["prevalence"][f] for f in FINDINGS] for n in FULL_SIZES if n != "test"]
        )
        return float((prev.std(axis=0) / prev.mean(axis=0)).mean())

    assert spread("dirichlet") > 2 * spread("iid")


def test_test_set_is_representative(reports, full_meta):
    test = reports["iid"][1]["sets"]["test"]
    assert abs(test["age"]["mean"] - full_meta["age"].mean()) < 2
    # about as many images per patient as the whole data set (not a few heavy patients)
    assert test["patients"] > 0.7 * 10120 / (112120 / 30805)


def test_split_is_deterministic_and_ignores_id_spelling(full_meta):
    sample = full_meta.iloc[:3000].copy()
    cfg = PartitionConfig()
    a = plan_split(sample, cfg, 7)
    b = plan_split(sample, cfg, 7)
    renamed = sample.assign(patient_id="p" + sample["patient_id"].str[::-1] + "x")
    c = plan_split(renamed, cfg, 7)
    d = plan_split(sample, cfg, 8)
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.split, b.split)
    assert np.array_equal(a.assignment, c.assignment) and np.array_equal(a.split, c.split)
    assert not np.array_equal(a.assignment, d.assignment)


def test_unknown_strategy_and_leaks_are_errors(full_meta):
    with pytest.raises(PartitionError, match="expected one of"):
        plan_split(full_meta.iloc[:100], PartitionConfig(strategy="geographic"), 1)
    leaking = {"patient_overlap": {"site-a|test": 2}, "sets": {}}
    with pytest.raises(PartitionError, match=r"site-a\|test"):
        check_disjoint(leaking)


def test_split_plan_cli_on_full_metadata(tmp_path):
    out = tmp_path / "PLAN.json"
    result = CliRunner().invoke(
        app,
        [
            "split-plan",
            str(embedded_metadata_path()),
            "--out",
            str(out),
            "--params",
            str(tmp_path / "absent.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Pneumo" in result.output and "site-e" in result.output
    assert "patients shared between any two sets: 0" in result.output
    plan = json.loads(out.read_text())
    counts = pd.Series(plan["assignment"]).value_counts().to_dict()
    assert counts == FULL_SIZES
    assert len(plan["validation"]) == sum(
        round(0.1 * v) for k, v in FULL_SIZES.items() if k != "test"
    )
