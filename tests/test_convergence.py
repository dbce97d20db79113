"""Learning-curve convergence (fedcxr.convergence) and the curve a pooled run records."""

from __future__ import annotations

import pytest

from fedcxr.convergence import CurvePoint, first_reaching, plateau


def _curve(*values: float | None) -> list[CurvePoint]:
    return [CurvePoint(i + 1, v) for i, v in enumerate(values)]


def test_a_flat_tail_is_converged() -> None:
    got = plateau(_curve(0.6, 0.75, 0.82, 0.85, 0.852, 0.851, 0.853), window=3, tol=0.005)
    assert got.converged
    assert got.best == 0.853 and got.best_at == 7
    assert got.last_gain == pytest.approx(0.003)


def test_a_rising_tail_is_not_converged() -> None:
    got = plateau(_curve(0.6, 0.7, 0.75, 0.78, 0.80, 0.82), window=3, tol=0.005)
    assert not got.converged
    assert got.last_gain == pytest.approx(0.82 - 0.75)
    assert "still improving" in got.why()


def test_a_falling_tail_counts_as_converged() -> None:
    # Past the plateau (overfitting): more training did not pay, which is what is asked.
    assert plateau(_curve(0.7, 0.85, 0.84, 0.83, 0.82), window=3, tol=0.005).converged


def test_too_short_or_undefined_curves_are_not_converged() -> None:
    short = plateau(_curve(0.8, 0.8, 0.8), window=3, tol=0.005)
    assert not short.converged and short.last_gain is None and "too short" in short.why()
    empty = plateau(_curve(None, None, None, None), window=3, tol=0.005)
    assert not empty.converged and empty.best is None
    # Undefined points are skipped, not read as zero.
    assert plateau(_curve(0.8, None, 0.85, 0.851, 0.85, 0.849), 3, 0.005).converged


def test_tolerance_is_inclusive_and_arguments_are_checked() -> None:
    assert plateau(_curve(0.5, 0.5, 0.5, 0.5, 0.505), window=1, tol=0.005 + 1e-12).converged
    with pytest.raises(ValueError, match="window"):
        plateau(_curve(0.5), window=0, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        plateau(_curve(0.5), window=1, tol=-1.0)


def test_first_reaching() -> None:
    curve = [CurvePoint(2, 0.7), CurvePoint(4, None), CurvePoint(6, 0.81), CurvePoint(8, 0.9)]
    assert first_reaching(curve, 0.8) == 6
    assert first_reaching(curve, 0.95) is None


def test_curve_points_round_trip_and_reject_bad_json() -> None:
    point = CurvePoint(3, 0.8)
    assert CurvePoint.from_json(point.to_json()) == point
    assert CurvePoint.from_json([2, None]) == CurvePoint(2, None)
    with pytest.raises(ValueError, match=r"run\.json"):
        CurvePoint.from_json([1, 2, 3], "run.json")


def test_a_pooled_run_records_one_validation_point_per_epoch(tmp_path) -> None:
    from fedsites import SITES, make_sites

    from fedcxr.runs import read_card
    from fedcxr.train.ddpspec import DDPSpec
    from fedcxr.train.pooled import train_pooled

    root = make_sites(tmp_path / "sites")
    folders = tuple(root / s for s in SITES)
    spec = DDPSpec(
        data=folders[:1],
        out=tmp_path / "run",
        task="pneumonia",
        epochs=3,
        batch_size=8,
        lr=1e-3,
        lr_schedule="cosine",
        image_size=32,
        augment=False,
        val_data=folders,
    )
    card = train_pooled(spec, "local_site-a", progress=False)
    assert [p.epochs for p in card.curve] == [1, 2, 3]
    assert all(p.val_auroc is not None and 0.0 <= p.val_auroc <= 1.0 for p in card.curve)
    assert read_card(tmp_path / "run").curve == card.curve  # survives run.json
    # No validation folders: no curve, and the run is not called converged.
    bare = train_pooled(
        DDPSpec(data=folders[:1], out=tmp_path / "bare", task="pneumonia", epochs=1,
                batch_size=8, image_size=32, augment=False),
        "local_site-a",
        progress=False,
    )  # fmt: skip
    assert bare.curve == ()


def test_round_curve_keeps_its_points_across_a_restart(tmp_path) -> None:
    import torch
    from fedsites import SITES, make_sites

    from fedcxr.models import build_model
    from fedcxr.train.validate import RoundCurve, Validator

    root = make_sites(tmp_path / "sites")
    validator = Validator([root / s for s in SITES], "pneumonia", 32, 8, torch.device("cpu"))
    model = build_model("smallcnn", 1)
    path = tmp_path / "curve.json"
    curve = RoundCurve(validator, model, path)
    curve(1, model.state_dict())
    curve(2, model.state_dict())
    again = RoundCurve(validator, build_model("smallcnn", 1), path)  # a resumed stage
    assert again.by_round == curve.by_round and set(again.by_round) == {1, 2}
    assert [p.epochs for p in again.points(local_epochs=3)] == [3, 6]
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"curve\.json"):
        RoundCurve(validator, model, path)


def test_runs_side_by_side_equal_runs_one_at_a_time(tmp_path) -> None:
    from fedsites import SITES, make_sites
    from safetensors.torch import load_file

    from fedcxr.train.ddpspec import DDPSpec
    from fedcxr.train.pooled import train_pooled_many

    root = make_sites(tmp_path / "sites")

    def jobs(out: str) -> list:
        return [
            (DDPSpec(data=(root / s,), out=tmp_path / out / s, task="pneumonia", epochs=2,
                     batch_size=8, image_size=32, augment=False), f"local_{s}")
            for s in SITES[:2]
        ]  # fmt: skip

    parallel = train_pooled_many(jobs("two"), workers=2)
    serial = train_pooled_many(jobs("one"), workers=1, threads=1)  # the threads of each of two
    assert [c.config for c in parallel] == [f"local_{s}" for s in SITES[:2]]
    for s in SITES[:2]:
        a = load_file(str(tmp_path / "two" / s / "model.safetensors"))
        b = load_file(str(tmp_path / "one" / s / "model.safetensors"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert [c.n_train for c in parallel] == [c.n_train for c in serial]
