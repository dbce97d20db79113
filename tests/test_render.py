"""Tests for the synthetic chest radiograph renderer."""

from __future__ import annotations

import numpy as np
import pytest

from fedcxr.labels import FINDINGS
from fedcxr.synth.render import N_SCANNERS, RenderSpec, drawn_findings, render

SIZE = 256


def _img(spec: RenderSpec, size: int = SIZE) -> np.ndarray:
    return render(spec, size).astype(np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("size", [1024, 64])
def test_shape_dtype(size: int) -> None:
    out = render(RenderSpec(1, 0, ("Nodule",)), size)
    assert out.shape == (size, size)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    assert out.std() > 10  # not blank


def test_deterministic() -> None:
    spec = RenderSpec(7, 3, ("Mass", "Effusion"), view="AP", sex="F", scanner=2, age=70)
    assert render(spec, 128).tobytes() == render(spec, 128).tobytes()
    assert drawn_findings(spec) == drawn_findings(spec)


def test_patients_differ_follow_ups_similar() -> None:
    a1 = _img(RenderSpec(11, 0, ()))
    a2 = _img(RenderSpec(11, 1, ()))
    b = _img(RenderSpec(12, 0, ()))
    assert not np.array_equal(a1, a2)
    assert not np.array_equal(a1, b)
    # Same patient: shared anatomy; the difference is larger between patients.
    assert np.abs(a1 - a2).mean() < 0.7 * np.abs(a1 - b).mean()
    assert _corr(a1, a2) > _corr(a1, b)


def _bright_width(img: np.ndarray, rows: slice) -> float:
    band = img[rows, int(0.15 * SIZE) : int(0.85 * SIZE)]
    lo, hi = np.percentile(img, 20), np.percentile(img, 80)
    return float((band > 0.5 * (lo + hi)).mean())


def test_cardiomegaly_widens_heart() -> None:
    wider = 0
    for ps in range(3):
        base = _img(RenderSpec(ps, 0, ()))
        big = _img(RenderSpec(ps, 0, ("Cardiomegaly",), miss_prob=0.0))
        rows = slice(int(0.55 * SIZE), int(0.68 * SIZE))
        wider += _bright_width(big, rows) > _bright_width(base, rows) + 0.05
    assert wider == 3


def test_effusion_brightens_lower_lateral_lung() -> None:
    for ps in range(3):
        base = _img(RenderSpec(ps, 0, ()))
        eff = _img(RenderSpec(ps, 0, ("Effusion",), miss_prob=0.0))
        diff = eff - base
        low = diff[int(0.55 * SIZE) : int(0.85 * SIZE)]
        high = diff[int(0.15 * SIZE) : int(0.45 * SIZE)]
        assert low.mean() > 1.0
        assert low.mean() > 5 * max(high.mean(), 0.1)


def test_pneumothorax_darkens_a_region() -> None:
    base = _img(RenderSpec(4, 2, ()))
    ptx = _img(RenderSpec(4, 2, ("Pneumothorax",), miss_prob=0.0))
    diff = ptx - base
    assert (diff < -4).sum() > 0.005 * SIZE * SIZE
    # Darker overall in the lung zone, not brighter.
    assert diff[int(0.1 * SIZE) : int(0.7 * SIZE)].mean() < 0


@pytest.mark.parametrize(
    "finding",
    [
        "Consolidation",
        "Pneumonia",
        "Infiltration",
        "Edema",
        "Fibrosis",
        "Hernia",
        "Atelectasis",
        "Pleural_Thickening",
        "Nodule",
        "Mass",
    ],
)
def test_opacities_change_pixels(finding: str) -> None:
    base = _img(RenderSpec(5, 1, ()))
    ill = _img(RenderSpec(5, 1, (finding,), miss_prob=0.0))
    assert np.abs(ill - base).max() > 25, finding


def test_emphysema_darkens_lungs() -> None:
    base = _img(RenderSpec(6, 1, ()))
    emph = _img(RenderSpec(6, 1, ("Emphysema",), miss_prob=0.0))
    lungs = slice(int(0.25 * SIZE), int(0.6 * SIZE))
    assert emph[lungs].mean() < base[lungs].mean() - 2


def test_scanners_differ() -> None:
    imgs = [_img(RenderSpec(8, 0, (), scanner=s)) for s in range(N_SCANNERS)]
    stats = [(im.mean(), im.std()) for im in imgs]
    for i in range(N_SCANNERS):
        for j in range(i + 1, N_SCANNERS):
            dm = abs(stats[i][0] - stats[j][0])
            ds = abs(stats[i][1] - stats[j][1])
            assert dm > 4 or ds > 4, (i, j, stats)


def test_views_and_sex_change_image() -> None:
    pa = _img(RenderSpec(9, 0, ()))
    assert np.abs(_img(RenderSpec(9, 0, (), view="AP")) - pa).mean() > 3
    assert np.abs(_img(RenderSpec(9, 0, (), sex="F")) - pa).mean() > 1


def test_miss_prob_one_draws_nothing() -> None:
    labels = tuple(FINDINGS)
    spec = RenderSpec(10, 4, labels, miss_prob=1.0)
    assert drawn_findings(spec) == ()
    assert render(spec, 128).tobytes() == render(RenderSpec(10, 4, ()), 128).tobytes()


def test_drawn_findings_miss_prob() -> None:
    labels = ("Effusion", "Nodule", "Mass")
    assert drawn_findings(RenderSpec(1, 2, labels, miss_prob=0.0)) == labels
    counts = sum(len(drawn_findings(RenderSpec(1, i, labels, miss_prob=0.5))) for i in range(200))
    assert 200 < counts < 400  # about half of 600
    # Removing a missed label from the spec leaves the image unchanged.
    spec = RenderSpec(3, 5, ("Nodule", "Mass"), miss_prob=0.5)
    kept = drawn_findings(spec)
    same = RenderSpec(3, 5, kept, miss_prob=0.0)
    assert render(spec, 96).tobytes() == render(same, 96).tobytes()


def test_box_places_lesion() -> None:
    box = (620.0, 300.0, 120.0, 120.0)
    spec = RenderSpec(2, 3, ("Mass",), boxes=(("Mass", *box),), miss_prob=0.0)
    diff = np.abs(_img(spec) - _img(RenderSpec(2, 3, ())))
    s = SIZE / 1024
    x0, y0, w, h = (int(v * s) for v in box)
    pad = int(0.03 * SIZE)
    inside = diff[y0 - pad : y0 + h + pad, x0 - pad : x0 + w + pad].sum()
    assert inside > 0.8 * diff.sum()
    assert diff.sum() > 0


def test_small_nodule_box() -> None:
    spec = RenderSpec(
        2, 3, ("Nodule",), boxes=(("Nodule", 300.0, 420.0, 40.0, 40.0),), miss_prob=0.0
    )
    diff = np.abs(_img(spec, 512) - _img(RenderSpec(2, 3, ()), 512))
    ys, xs = np.nonzero(diff > 8)
    assert len(ys) > 20
    assert abs(np.median(xs) - 160) < 12 and abs(np.median(ys) - 220) < 12


def test_invalid_spec() -> None:
    with pytest.raises(ValueError):
        render(RenderSpec(1, 1, ("Flu",)), 64)
    with pytest.raises(ValueError):
        render(RenderSpec(1, 1, (), scanner=N_SCANNERS), 64)
    with pytest.raises(ValueError):
        render(RenderSpec(1, 1, (), view="LL"), 64)


def test_nih_boxes_used_without_spec_boxes() -> None:
    from fedcxr.synth import lesions as mod

    boxes = mod._nih_boxes()
    assert {"Nodule", "Mass", "Infiltration", "Pneumothorax"} <= set(boxes)
    assert all(v.shape[1] == 4 for v in boxes.values())


def test_upsample4_is_bilinear_resize() -> None:
    from fedcxr.synth.raster import resize, upsample4

    a = np.random.default_rng(0).random((40, 24)).astype(np.float32) * 200
    up = upsample4(a)
    assert up.shape == (160, 96) and up.dtype == np.float32
    np.testing.assert_allclose(up, resize(a, 160, 96, bicubic=False), atol=1e-3)
    noise = np.random.default_rng(1).normal(0, 30, (160, 96)).astype(np.float32)
    quant = upsample4(a, noise, quantize=True, block=7)
    assert quant.dtype == np.uint8
    assert np.array_equal(quant, np.clip(up + noise, 0, 255).astype(np.uint8))
