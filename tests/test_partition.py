"""Patient-disjoint splitting: exact sizes at full scale, strategies that differ as designed."""

import gzip
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.config import PartitionConfig
from fedcxr.labels import FINDINGS
from fedcxr.metadata import embedded_metadata_path, read_metadata
from fedcxr.partition import (
    PARTITIONERS,
    UNUSED,
    PartitionError,
    SplitPlan,
    check_disjoint,
    fill_exact,
    fit_sizes,
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


# The paper's design at full scale (params.yaml's default is a 1/45 scale of it).
FULL_SCALE = {"test_size": 10120, "site_sizes": (20000, 25000, 15000, 30000, 12000)}


def full_scale(**keys: object) -> PartitionConfig:
    """A PartitionConfig with the full-scale sizes (and `keys`)."""
    return PartitionConfig(**{**FULL_SCALE, **keys})


@pytest.fixture(scope="module")
def full_meta() -> pd.DataFrame:
    meta, info = read_metadata(embedded_metadata_path())
    assert info.rows == 112120
    return meta


@pytest.fixture(scope="module")
def reports(full_meta):
    out = {}
    for name in sorted(PARTITIONERS):
        cfg = full_scale(strategy=name, dirichlet_alpha=0.3)
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
    cfg = full_scale()
    a = plan_split(sample, cfg, 7)
    b = plan_split(sample, cfg, 7)
    renamed = sample.assign(patient_id="p" + sample["patient_id"].str[::-1] + "x")
    c = plan_split(renamed, cfg, 7)
    d = plan_split(sample, cfg, 8)
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.split, b.split)
    assert np.array_equal(a.assignment, c.assignment) and np.array_equal(a.split, c.split)
    assert not np.array_equal(a.assignment, d.assignment)


def test_unknown_strategy_and_leaks_are_errors(full_meta):
    with pytest.raises(ValidationError, match="expected one of the names"):
        PartitionConfig(strategy="geographic")  # refused when params load
    unchecked = PartitionConfig.model_construct(strategy="geographic")
    with pytest.raises(PartitionError, match="expected one of"):
        plan_split(full_meta.iloc[:100], unchecked, 1)
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
            str(_full_scale_params(tmp_path)),
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


# --- sizes mean what they say (partition.fit) -----------------------------------------------

PAPER_SITES = (20000, 25000, 15000, 30000, 22000)  # as printed: 122,120 with the test set
DEFAULT_SITES = (20000, 25000, 15000, 30000, 12000)


def _digest(plan: SplitPlan) -> str:
    data = plan.assignment.astype(np.int64).tobytes() + "|".join(plan.split).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.parametrize(
    ("n", "strategy", "targets", "digest"),
    [
        (2000, "demographic", (180, 357, 446, 268, 535, 214), "e9ed276cc434b369"),
        (2500, "iid", (226, 446, 557, 334, 669, 268), "72cd570c3e27e4ce"),
        (3000, "dirichlet", (271, 535, 669, 401, 803, 321), "fb34af79aab5357a"),
    ],
)
def test_default_scaled_plan_is_the_one_made_before_partition_fit(
    full_meta, n, strategy, targets, digest
):
    """Digests of plans made by the code before partition.fit existed: the default (auto) keeps
    today's scaling on a subset byte for byte, so the pipeline's hashes stay valid."""
    sub = full_meta.iloc[:n].reset_index(drop=True)
    cfg = full_scale(strategy=strategy)
    plan = plan_split(sub, cfg, 42)
    assert plan.targets == targets and _digest(plan) == digest
    report = split_report(sub, plan, cfg, 42)
    assert report["sizes"]["scaled"] is True and report["sizes"]["mode"] == "scale"
    assert report["targets_met"] is True
    assert report["exact_sizes"] is False  # scaled sizes are not the configured ones
    assert "scaled" in report["sizes"]["note"] and "112,120" in report["sizes"]["note"]
    assert report["unused"] == {"images": 0, "patients": 0}


def test_fit_sizes_auto_scales_full_scale_sizes_on_a_subset_only():
    on_subset = fit_sizes(2000, 10120, DEFAULT_SITES)
    assert on_subset.mode == "scale" and on_subset.scaled
    assert list(on_subset.targets) == scale_targets(2000, 10120, DEFAULT_SITES)
    full = fit_sizes(112120, 10120, DEFAULT_SITES)
    assert full.mode == "exact" and not full.scaled and full.unused == 0
    assert full.targets == (10120, *DEFAULT_SITES)


def test_paper_sizes_on_all_nih_rows_are_an_error_unless_scaling_is_asked():
    with pytest.raises(PartitionError) as info:
        fit_sizes(112120, 10120, PAPER_SITES)
    assert "122,120" in str(info.value) and "112,120" in str(info.value)
    assert "partition.fit: scale" in str(info.value)
    with pytest.raises(PartitionError, match="122,120"):
        fit_sizes(112120, 10120, PAPER_SITES, "exact")
    scaled = fit_sizes(112120, 10120, PAPER_SITES, "scale")
    assert scaled.scaled and sum(scaled.targets) == 112120 and scaled.unused == 0


def test_small_sizes_are_met_exactly_and_never_shrunk_to_one_image():
    # The case: site_sizes [5, 5] beside the default test_size on 2,000 images.
    with pytest.raises(PartitionError) as info:
        fit_sizes(2000, 10120, (5, 5))
    assert "10,130" in str(info.value) and "2,000" in str(info.value)
    exact = fit_sizes(2000, 10, (5, 5))
    assert exact.targets == (10, 5, 5) and exact.unused == 1980 and not exact.scaled
    assert "1,980 image(s) left unused" in exact.describe()
    assert fit_sizes(2000, 10, (5, 5), "scale").targets == (1000, 500, 500)
    # Full-scale sizes asked to be exact on a subset (NIH less excluded rows) do not fit.
    with pytest.raises(PartitionError, match=r"112,120 images .* the data has 112,100"):
        fit_sizes(112100, 10120, DEFAULT_SITES, "exact")
    with pytest.raises(PartitionError, match="no image"):
        fit_sizes(100, 1, (1, 100000), "scale")


def test_exact_sizes_below_the_data_leave_the_rest_unused(full_meta):
    sub = full_meta.iloc[:2000].reset_index(drop=True)
    cfg = PartitionConfig(test_size=40, site_sizes=(60, 30), fit="exact")
    plan = plan_split(sub, cfg, 42)
    report = split_report(sub, plan, cfg, 42)
    check_disjoint(report)
    assert {n: e["images"] for n, e in report["sets"].items()} == {
        "test": 40,
        "site-a": 60,
        "site-b": 30,
    }
    assert report["exact_sizes"] is True and report["sizes"]["scaled"] is False
    assert report["unused"]["images"] == 2000 - 130 == int((plan.set_of() == UNUSED).sum())
    assert set(plan.split[plan.set_of() == UNUSED]) == {UNUSED}
    assert any(pair.endswith("|unused") for pair in report["patient_overlap"])
    owners = pd.Series(plan.set_of()).groupby(sub["patient_id"].to_numpy()).nunique()
    assert int(owners.max()) == 1  # unused patients are whole patients too


def _subset_csv(tmp_path, rows: int):
    """The first `rows` rows of the embedded NIH metadata as a CSV (as split-plan reads it)."""
    with gzip.open(embedded_metadata_path(), "rt") as fh:
        lines = [next(fh) for _ in range(rows + 1)]
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text("".join(lines))
    return path


def _full_scale_params(tmp_path, **partition):
    """A params.yaml whose partition section has the full-scale sizes (and `partition`)."""
    params = tmp_path / "params.yaml"
    full = {"test_size": FULL_SCALE["test_size"], "site_sizes": list(FULL_SCALE["site_sizes"])}
    params.write_text(yaml.safe_dump({"partition": {**full, **partition}}))
    return params


def _split_plan(tmp_path, csv, **partition):
    params = _full_scale_params(tmp_path, **partition)
    out = tmp_path / "PLAN.json"
    args = ["split-plan", str(csv), "--out", str(out), "--params", str(params)]
    return CliRunner().invoke(app, args), out


def test_split_plan_says_when_sizes_were_scaled(tmp_path):
    result, out = _split_plan(tmp_path, _subset_csv(tmp_path, 2000))
    assert result.exit_code == 0, result.output
    assert "exact sizes: False" in result.output
    assert "sizes scaled in proportion (partition.fit auto)" in result.output
    assert json.loads(out.read_text())["report"]["sizes"]["scaled"] is True


def test_split_plan_refuses_paper_sizes_on_all_rows_unless_scaling_is_asked(tmp_path):
    csv = embedded_metadata_path()
    result, out = _split_plan(tmp_path, csv, site_sizes=list(PAPER_SITES))
    assert result.exit_code == 1 and not out.exists()
    assert "122,120" in result.output and "112,120" in result.output
    result, out = _split_plan(tmp_path, csv, site_sizes=list(PAPER_SITES), fit="scale")
    assert result.exit_code == 0, result.output
    assert "exact sizes: False" in result.output and "scaled" in result.output


def test_split_plan_checks_the_strategy_option_like_params(tmp_path):
    csv = _subset_csv(tmp_path, 50)
    args = ["split-plan", str(csv), "--strategy", "demografic", "--out", str(tmp_path / "P")]
    result = CliRunner().invoke(app, [*args, "--params", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "'partition.strategy'" in result.output and "demografic" in result.output


# --- a leaking plan is caught ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_plan(full_meta):
    sub = full_meta.iloc[:1500].reset_index(drop=True)
    cfg = PartitionConfig(test_size=200, site_sizes=(500, 400), fit="exact")
    plan = plan_split(sub, cfg, 3)
    return sub, cfg, plan


def _leak(plan: SplitPlan, **fields) -> SplitPlan:
    return SplitPlan(
        sets=plan.sets,
        targets=plan.targets,
        assignment=fields.get("assignment", plan.assignment).copy(),
        split=fields.get("split", plan.split).copy(),
        sizes=plan.sizes,
    )


def _multi_image_patient(meta, plan, set_name: str, split: str | None = None) -> np.ndarray:
    """Row numbers of one patient with several images in `set_name` (and `split`)."""
    mask = plan.set_of() == set_name
    if split is not None:
        mask &= plan.split == split
    counts = meta.loc[mask, "patient_id"].value_counts()
    patient = counts.index[counts > 1][0]
    return np.flatnonzero(mask & (meta["patient_id"] == patient).to_numpy())


def test_the_clean_plan_passes_the_check(small_plan):
    meta, cfg, plan = small_plan
    report = split_report(meta, plan, cfg, 3)
    assert report["patient_overlap_total"] == 0
    check_disjoint(report)  # does not raise


@pytest.mark.parametrize(("source", "target"), [("test", 1), ("site-a", 2), (UNUSED, 1)])
def test_a_patient_in_two_sets_is_detected(small_plan, source, target):
    meta, cfg, plan = small_plan
    rows = _multi_image_patient(meta, plan, source)
    assignment = plan.assignment.copy()
    assignment[rows[0]] = target  # one image of the patient moves; the others stay
    split = plan.split.copy()
    split[rows[0]] = "train"
    leaking = _leak(plan, assignment=assignment, split=split)
    report = split_report(meta, leaking, cfg, 3)
    pair = "|".join(sorted([source, plan.sets[target]]))
    assert report["patient_overlap"][pair] == 1
    assert report["patient_overlap_total"] == 1
    with pytest.raises(PartitionError, match=rf"'{pair.replace('|', '[|]')}': 1"):
        check_disjoint(report)


def test_a_patient_in_train_and_val_of_one_site_is_detected(small_plan):
    meta, cfg, plan = small_plan
    rows = _multi_image_patient(meta, plan, "site-b", "train")
    split = plan.split.copy()
    split[rows[0]] = "val"
    report = split_report(meta, _leak(plan, split=split), cfg, 3)
    assert report["sets"]["site-b"]["train_val_patient_overlap"] == 1
    assert report["patient_overlap_total"] == 0  # the sets themselves are still disjoint
    with pytest.raises(PartitionError, match=r"'site-b:train\|val': 1"):
        check_disjoint(report)
