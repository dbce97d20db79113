"""Resize: letterboxed square resizing and the shards written by the ingest->deid->resize stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nihfolder import SECRET_ENV, TEST_SECRET, gray_png, make_nih_folder

from fedcxr.config import DeidConfig, IngestConfig, ResizeConfig
from fedcxr.deid import Secret, deidentify
from fedcxr.imaging import open_image, to_gray8
from fedcxr.ingest import ingest
from fedcxr.resize import ResizeError, open_shards, resize_all, square_resize

KEY = Secret(b"r" * 32, "test key", development=False)


def _block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    h, w = pixels.shape
    blocks = pixels.reshape(h // factor, factor, w // factor, factor).astype(np.float64)
    return blocks.mean(axis=(1, 3))


def _nonzero(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=shape, dtype=np.uint8)


# --- square_resize ---------------------------------------------------------------------------


def test_1024_to_512_is_a_2x2_block_mean():
    pixels = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
    out = square_resize(pixels, 512)
    assert out.shape == (512, 512)
    assert out.dtype == np.uint8
    diff = np.abs(out.astype(np.float64) - _block_mean(pixels, 2))
    assert diff.max() <= 1.0


def test_same_size_square_is_returned_unchanged():
    pixels = _nonzero((48, 48), 1)
    out = square_resize(pixels, 48)
    assert np.array_equal(out, pixels)
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(("shape", "top", "left"), [((40, 64), 12, 0), ((64, 40), 0, 12)])
def test_non_square_is_letterboxed_centred_with_zero_padding(shape, top, left):
    pixels = _nonzero(shape, 2)
    out = square_resize(pixels, 64)
    h, w = shape
    assert out.shape == (64, 64)
    assert np.array_equal(out[top : top + h, left : left + w], pixels)
    padding = np.ones((64, 64), dtype=bool)
    padding[top : top + h, left : left + w] = False
    assert not out[padding].any()


def test_non_square_letterbox_then_shrink_keeps_aspect():
    pixels = _nonzero((64, 128), 3)  # wide: 32 rows of padding above and below at 128
    out = square_resize(pixels, 64)
    assert out.shape == (64, 64)
    assert not out[:16].any()
    assert not out[48:].any()
    diff = np.abs(out[16:48].astype(np.float64) - _block_mean(pixels, 2))
    assert diff.max() <= 1.0


def _span(length: int, side: int, size: int) -> tuple[int, int]:
    """Output pixels covered by content of `length` centred in `side`, scaled to `size`."""
    offset = (side - length) // 2
    return round(offset * size / side), round((offset + length) * size / side)


@pytest.mark.parametrize(
    ("shape", "size"), [((101, 101), 50), ((63, 100), 37), ((100, 63), 37), ((37, 37), 64)]
)
def test_odd_sizes_keep_a_constant_image_constant_and_centred(shape, size):
    pixels = np.full(shape, 200, dtype=np.uint8)
    out = square_resize(pixels, size).astype(int)
    assert out.shape == (size, size)
    h, w = shape
    side = max(h, w)
    (r0, r1), (c0, c1) = _span(h, side, size), _span(w, side, size)
    m = 3  # resampling ringing stays within a few output pixels of an edge
    assert np.abs(out[r0 + m : r1 - m, c0 + m : c1 - m] - 200).max() <= 2
    outside = np.ones((size, size), dtype=bool)
    outside[max(r0 - m, 0) : r1 + m, max(c0 - m, 0) : c1 + m] = False
    assert out[outside].max(initial=0) <= 2
    if h != w:  # the content band is centred: as much padding before it as after (±1)
        before, after = (r0, size - r1) if h < w else (c0, size - c1)
        assert before > 3
        assert abs(before - after) <= 1


def test_odd_size_resize_returns_uint8():
    out = square_resize(_nonzero((63, 100), 4), 37)
    assert out.dtype == np.uint8
    assert out.shape == (37, 37)


def test_tiny_odd_letterbox_puts_the_extra_row_at_the_bottom():
    pixels = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.uint8)
    out = square_resize(pixels, 4)
    assert np.array_equal(out[:3], pixels)
    assert not out[3].any()


# --- in-process resize_all -------------------------------------------------------------------


def _prepared(tmp_path: Path, **kwargs) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    built = make_nih_folder(tmp_path / "nih", **kwargs)
    manifest, _ = ingest(built["root"], IngestConfig(workers=1, max_bad_fraction=0.5))
    metadata, _ = deidentify(manifest, DeidConfig(on_violation="scrub"), KEY)
    return built, manifest, metadata


def _expected(data: bytes, size: int) -> np.ndarray:
    return square_resize(to_gray8(open_image(data)), size)


def test_resize_all_rewrites_stale_shards(tmp_path):
    built, manifest, metadata = _prepared(tmp_path, n_patients=5)
    out = tmp_path / "resized"
    first = resize_all(
        built["root"], manifest, metadata, ResizeConfig(size=16, shard_images=3, workers=1), out
    )
    assert first["shards"] == [f"shard_{k:03d}.npy" for k in range(4)]
    second = resize_all(
        built["root"], manifest, metadata, ResizeConfig(size=16, shard_images=8, workers=1), out
    )
    assert second["shards"] == ["shard_000.npy", "shard_001.npy"]
    assert sorted(p.name for p in out.glob("shard_*.npy")) == second["shards"]
    shards = open_shards(out)
    assert [s.shape for s in shards] == [(8, 16, 16), (2, 16, 16)]
    names = manifest["image_index"].to_numpy()[metadata["manifest_row"].to_numpy()]
    for i, name in enumerate(names):
        assert np.array_equal(shards[i // 8][i % 8], _expected(built["files"][name], 16))


def test_resize_all_fails_when_an_ingested_image_is_gone(tmp_path):
    built, manifest, metadata = _prepared(tmp_path)
    gone = built["loose"][3]
    (built["root"] / "images" / gone).unlink()
    with pytest.raises(ResizeError, match=gone):
        resize_all(
            built["root"], manifest, metadata, ResizeConfig(size=16, workers=1), tmp_path / "out"
        )


def test_resize_uses_the_copy_ingest_accepted(tmp_path):
    built = make_nih_folder(tmp_path / "nih", n_patients=2, archive="batch_01.tar.gz")
    name = built["archived"][0]
    loose_copy = gray_png(np.random.default_rng(99), 64)
    (built["root"] / "images" / name).write_bytes(loose_copy)
    manifest, report = ingest(built["root"], IngestConfig(workers=1, max_bad_fraction=0.5))
    assert report["problems"]["by_kind"] == {"duplicate": 1}
    row = manifest.loc[manifest["image_index"] == name].iloc[0]
    assert row["location"] == f"images/{name}"
    assert row["sha256"] == hashlib.sha256(loose_copy).hexdigest()
    metadata, _ = deidentify(manifest, DeidConfig(), KEY)
    out = tmp_path / "out"
    resize_all(built["root"], manifest, metadata, ResizeConfig(size=64, workers=1), out)
    i = int(np.flatnonzero(manifest["image_index"].to_numpy()[metadata["manifest_row"]] == name)[0])
    assert np.array_equal(open_shards(out)[0][i], _expected(loose_copy, 64))


# --- the stage scripts end to end ------------------------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_stages_write_the_resized_pixels_of_every_image(tmp_path, workdir, write_params, run_stage):
    built = make_nih_folder(
        tmp_path / "nih",
        n_patients=5,
        rgba=True,
        gray16=True,
        archive="batch_01.tar.gz",
        archive_count=3,
    )
    assert built["rgba"] in built["loose"]
    assert len(built["archived"]) == 3
    size, per_shard = 32, 4
    write_params(workdir, built["root"], resize={"size": size, "shard_images": per_shard})
    env = {SECRET_ENV: TEST_SECRET}
    for stage in ("ingest", "deid", "resize"):
        done = run_stage(workdir, stage, env)
        assert done.returncode == 0, f"{stage}: {done.stderr}"

    out = workdir / "data/resized"
    summary = json.loads((out / "resize.json").read_text())
    assert summary["shards"] == ["shard_000.npy", "shard_001.npy", "shard_002.npy"]
    assert summary["images"] == 10
    assert summary["size"] == size
    shards = open_shards(out)
    assert [s.shape for s in shards] == [(4, size, size), (4, size, size), (2, size, size)]
    assert all(s.dtype == np.uint8 for s in shards)

    manifest = pd.read_csv(workdir / "data/ingest/manifest.csv", dtype=str)
    metadata = pd.read_csv(workdir / "data/deid/metadata.csv", dtype={"image_id": str})
    index = pd.read_csv(out / "index.csv", dtype={"image_id": str})
    assert sorted(index["image_id"]) == sorted(metadata["image_id"])
    assert sorted(zip(index["shard"], index["offset"], strict=True)) == [
        (k // per_shard, k % per_shard) for k in range(10)
    ]
    row_of = dict(zip(metadata["image_id"], metadata["manifest_row"], strict=True))
    seen = set()
    for entry in index.itertuples():
        name = manifest["image_index"].iloc[row_of[entry.image_id]]
        seen.add(name)
        expected = _expected(built["files"][name], size)
        assert np.array_equal(shards[entry.shard][entry.offset], expected), name
    assert seen == set(built["rows"])
    assert {built["rgba"], built["gray16"], *built["archived"]} <= seen
    del shards

    before = _digests(out)
    assert run_stage(workdir, "resize", env).returncode == 0
    assert _digests(out) == before, "a second resize run changed the output bytes"
    write_params(
        workdir, built["root"], resize={"size": size, "shard_images": per_shard, "workers": 2}
    )
    done = run_stage(workdir, "resize", env)
    assert done.returncode == 0, done.stderr
    assert _digests(out) == before, "two workers gave other bytes than one"
