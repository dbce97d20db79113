"""The embedded default: real NIH rows sampled by patient, rendered into an NIH-format folder."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedcxr.config import IngestConfig, SyntheticConfig
from fedcxr.ingest import ingest
from fedcxr.metadata import embedded_metadata_path, read_metadata
from fedcxr.synthesize import sample_by_patient, scanner_for, synthesize


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return pd.read_csv(embedded_metadata_path(), dtype=str, keep_default_na=False)


@pytest.mark.parametrize("n", [1, 37, 500])
def test_sample_by_patient_is_exact_and_keeps_whole_patients(raw, n):
    rows = sample_by_patient(raw, n, seed=3)
    assert len(rows) == n
    chosen = set(rows["Patient ID"])
    full = raw[raw["Patient ID"].isin(chosen)]
    assert len(full) == n, "a sampled patient lost some of their images"
    assert rows["Image Index"].is_monotonic_increasing
    assert rows.equals(sample_by_patient(raw, n, seed=3))
    assert not rows.equals(sample_by_patient(raw, n, seed=4))


def test_scanner_depends_on_view_and_is_stable_per_patient():
    assert scanner_for("17", "PA", 1) in (0, 1) and scanner_for("17", "AP", 1) in (2, 3)
    assert scanner_for("17", "AP", 1) == scanner_for("17", "AP", 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "nih"
    summary = synthesize(out, SyntheticConfig(n_images=12, workers=2), seed=5)
    return out, summary


def test_synthesize_writes_an_nih_format_folder(folder, raw):
    out, summary = folder
    meta, info = read_metadata(out / "Data_Entry_2017.csv")
    assert info.layout == "nih-2017" and len(meta) == 12 == summary["images"]
    # The rows are real NIH rows, unchanged.
    real = raw.set_index("Image Index").loc[meta["image_index"]]
    assert (real["Finding Labels"].to_numpy() == meta["finding_labels"].to_numpy()).all()
    assert (real["Patient Age"].astype(float).to_numpy() == meta["age"].to_numpy()).all()
    for name in meta["image_index"]:
        with Image.open(out / "images" / name) as image:
            assert image.mode == "L" and image.size == (1024, 1024)
    written = json.loads((out / "SYNTHETIC.json").read_text())
    assert sum(written["labelled"].values()) >= sum(written["drawn_in_pixels"].values())


def test_synthesize_is_deterministic_across_processes(folder, tmp_path):
    out, _ = folder
    again = tmp_path / "again"
    synthesize(again, SyntheticConfig(n_images=12, workers=1), seed=5)

    def digest(root):
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(out) == digest(again)


def test_synthetic_folder_passes_ingest_through_the_real_code(folder):
    out, _ = folder
    manifest, report = ingest(out, IngestConfig(workers=1))
    assert report["usable"] == 12 and report["problems"]["count"] == 0
    assert set(manifest["mode"]) == {"L"}
    # Findings show in the pixels: labelled images differ from their patient's mean image less
    # than different patients do is not guaranteed, but every image must be non-trivial.
    for name in manifest["image_index"]:
        pixels = np.asarray(Image.open(out / "images" / name))
        assert 20 < pixels.mean() < 235 and pixels.std() > 20


def test_enrich_raises_the_share_of_patients_with_a_finding(raw):
    plain = sample_by_patient(raw, 3000, seed=2)
    enriched = sample_by_patient(raw, 3000, seed=2, enrich={"Pneumonia": 10.0})
    share = {
        name: rows["Finding Labels"].str.contains("Pneumonia").mean()
        for name, rows in (("plain", plain), ("enriched", enriched))
    }
    assert len(enriched) == 3000
    assert share["enriched"] > 2 * share["plain"]
    # whole patients still
    assert len(raw[raw["Patient ID"].isin(set(enriched["Patient ID"]))]) == 3000


def test_enrich_rejects_unknown_findings_and_weights_below_one():
    from fedcxr.config import ConfigError, parse_params

    for bad in ({"Pneumonitis": 2.0}, {"Pneumonia": 0.5}):
        with pytest.raises(ConfigError, match=r"data\.synthetic\.enrich"):
            parse_params({"data": {"synthetic": {"enrich": bad}}})


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 5), (7, 7), (64, 33), (100, 1)])
@pytest.mark.parametrize("kind", ["random", "constant", "three levels"])
def test_png_encoder_round_trips_through_pil(shape, kind):
    from io import BytesIO

    from fedcxr.synth.png import encode_gray_png

    rng = np.random.default_rng(sum(shape))
    pixels = {
        "random": rng.integers(0, 256, shape, dtype=np.uint8),
        "constant": np.full(shape, 7, np.uint8),
        "three levels": (rng.integers(0, 3, shape) * 100).astype(np.uint8),
    }[kind]
    data = encode_gray_png(pixels)
    assert data == encode_gray_png(pixels.copy())
    with Image.open(BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == shape[::-1]
        assert np.array_equal(np.asarray(image), pixels)


def test_png_encoder_on_a_radiograph_is_smaller_than_pils_level_1():
    from io import BytesIO

    from fedcxr.synth.png import encode_gray_png
    from fedcxr.synth.render import RenderSpec, render

    pixels = render(RenderSpec(3, 4, ("Mass",), scanner=1), 1024)
    data = encode_gray_png(pixels)
    with Image.open(BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image), pixels)
    pil = BytesIO()
    Image.fromarray(pixels, mode="L").save(pil, format="PNG", compress_level=1)
    assert len(data) < len(pil.getvalue())


def test_png_encoder_rejects_what_is_not_gray8():
    from fedcxr.synth.png import encode_gray_png

    with pytest.raises(ValueError, match="2-D uint8"):
        encode_gray_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_gray_png(np.zeros((4, 4, 3), np.uint8))


def test_huffman_lengths_are_limited_complete_and_optimal():
    import heapq

    from fedcxr.synth.png import huffman_lengths

    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])  # unlimited Huffman would need 29 bits
    lengths = huffman_lengths(fib, 15)
    assert max(lengths) == 15 and sum(2.0**-n for n in lengths) == 1.0
    counts = np.random.default_rng(1).integers(1, 1000, 40).tolist()
    lengths = huffman_lengths(counts, 15)
    heap = list(counts)
    heapq.heapify(heap)
    cost = 0  # the cost of an unlimited Huffman code: the sum of its merges
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    assert sum(c * n for c, n in zip(counts, lengths, strict=True)) == cost
    assert huffman_lengths([0, 5, 0], 7) in ([1, 1, 0], [0, 1, 1])  # two codes at least
