"""Ingest: each image checked and hashed against NIH metadata; problems named; archives in place."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nihfolder import (
    EXTRA_COLUMN,
    SECRET_ENV,
    TEST_SECRET,
    exif_chunk,
    gray_png,
    itxt_chunk,
    listing,
    make_nih_folder,
    text_chunk,
    with_chunks,
    ztxt_chunk,
)

from fedcxr import sources
from fedcxr.config import IngestConfig
from fedcxr.imaging import scan_chunks
from fedcxr.ingest import IngestError, describe_chunk, ingest, inspect_image
from fedcxr.sources import ImageItem, SourceError, iter_archive

ONE = IngestConfig(workers=1)
KEY = b"k" * 32
ENV = {SECRET_ENV: TEST_SECRET}

TRUNCATED_WHY = "before its IEND chunk"
MISSING_WHY = "but no image file"
ORPHAN_WHY = "image has no row in"


def _bad_folder(tmp_path: Path, **kwargs) -> dict:
    options = {"truncated": True, "missing_image": True, "orphan_image": True} | kwargs
    return make_nih_folder(tmp_path / "nih", **options)


# --- inspect_image ---------------------------------------------------------------------------


def test_inspect_image_ok_record():
    data = gray_png(np.random.default_rng(0), 24)
    item = ImageItem("00000001_000.png", "x:images/00000001_000.png", data=data)
    record = inspect_image(item, KEY)
    assert record["status"] == "ok"
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["bytes"] == len(data)
    assert (record["width"], record["height"], record["mode"]) == (24, 24, "L")
    assert record["converted_from"] == ""
    assert record["location"] == "x:images/00000001_000.png"
    assert json.loads(record["chunks"]) == []


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"not a png at all", "undecodable"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "truncated")],
)
def test_inspect_image_bad_bytes(data, status):
    record = inspect_image(ImageItem("00000001_000.png", "images/00000001_000.png", data=data), KEY)
    assert record["status"] == status
    assert record["reason"]


def test_inspect_image_unreadable_path(tmp_path):
    item = ImageItem("00000001_000.png", "images/00000001_000.png", path=str(tmp_path / "gone"))
    record = inspect_image(item, KEY)
    assert record["status"] == "unreadable"
    assert str(tmp_path) not in record["reason"]  # the OS message, not the path


# --- clean folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["2017", "v2020"])
def test_clean_folder_every_row_usable(tmp_path, layout):
    built = make_nih_folder(tmp_path / "nih", layout=layout, size=48)
    root = built["root"]
    manifest, report = ingest(root, ONE)

    assert manifest["image_index"].tolist() == sorted(built["rows"])
    assert report["metadata_layout"] == built["layout"]
    assert report["metadata_file"] == built["metadata_path"].name
    assert report["metadata_rows"] == len(built["rows"]) == 12
    assert report["usable"] == 12
    assert report["images_found"] == 12
    assert report["problems"]["count"] == 0
    assert report["problems"]["excluded"] == []
    assert report["converted_to_gray8"]["count"] == 0
    assert report["archives"] == []
    assert report["dimensions"] == {"48x48": 12}
    for row in manifest.itertuples():
        path = root / "images" / row.image_index
        assert row.location == f"images/{row.image_index}"
        assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row.bytes == path.stat().st_size
        assert (row.width, row.height, row.mode) == (48, 48, "L")
        assert row.patient_id == str(int(row.image_index[:8]))
        assert row.age == float(built["ages"][row.image_index])
    # The trailing empty column of the 2017 layout is dropped, not passed on.
    assert not [c for c in manifest.columns if str(c).startswith("Unnamed")]
    assert {"orig_width", "orig_height", "spacing_x", "spacing_y"} <= set(manifest.columns)


def test_rgba_and_16bit_are_usable_and_recorded_as_converted(tmp_path):
    built = make_nih_folder(tmp_path / "nih", rgba=True, gray16=True)
    manifest, report = ingest(built["root"], ONE)
    assert report["usable"] == 12
    assert report["problems"]["count"] == 0
    converted = report["converted_to_gray8"]
    assert converted["count"] == 2
    assert converted["by_mode"] == {"I;16": 1, "RGBA": 1}
    assert sorted(converted["images"]) == sorted([built["rgba"], built["gray16"]])
    modes = dict(zip(manifest["image_index"], manifest["mode"], strict=True))
    assert modes[built["rgba"]] == "RGBA"
    assert modes[built["gray16"]] == "I;16"
    froms = dict(zip(manifest["image_index"], manifest["converted_from"], strict=True))
    assert froms[built["rgba"]] == "RGBA"
    assert froms[built["gray16"]] == "I;16"
    assert sum(v != "" for v in froms.values()) == 2


# --- problems --------------------------------------------------------------------------------


def test_default_max_bad_fraction_fails_naming_each_bad_file(tmp_path):
    built = _bad_folder(tmp_path)
    with pytest.raises(IngestError) as caught:
        ingest(built["root"], ONE)
    message = str(caught.value)
    lines = message.splitlines()

    def line_of(name: str) -> str:
        found = [line for line in lines if name in line]
        assert len(found) == 1, f"{name} not listed once in:\n{message}"
        return found[0]

    assert TRUNCATED_WHY in line_of(built["truncated"])
    assert MISSING_WHY in line_of(built["missing"])
    assert "no file" in line_of(built["missing"])
    assert ORPHAN_WHY in line_of(built["orphan"])
    assert "max_bad_fraction" in message
    assert "3 of 12" in message
    report = caught.value.report
    assert report["problems"]["by_kind"] == {"missing": 1, "no_metadata_row": 1, "truncated": 1}


@pytest.mark.parametrize(
    ("option", "status", "why"),
    [
        ("truncated", "truncated", TRUNCATED_WHY),
        ("missing_image", "missing", MISSING_WHY),
        ("orphan_image", "no_metadata_row", ORPHAN_WHY),
    ],
)
def test_single_problem_fails_by_default(tmp_path, option, status, why):
    built = make_nih_folder(tmp_path / "nih", **{option: True})
    name = built[{"truncated": "truncated", "missing_image": "missing"}.get(option, "orphan")]
    with pytest.raises(IngestError, match=f"{re.escape(name)}.*{why}"):
        ingest(built["root"], ONE)


def test_max_bad_fraction_excludes_and_reports_problems(tmp_path):
    built = _bad_folder(tmp_path)
    manifest, report = ingest(built["root"], IngestConfig(max_bad_fraction=0.5, workers=1))
    bad = {built["truncated"], built["missing"], built["orphan"]}
    assert set(manifest["image_index"]) == set(built["rows"]) - bad
    assert report["usable"] == len(manifest) == 10
    excluded = {p["image_index"]: p for p in report["problems"]["excluded"]}
    assert set(excluded) == bad
    assert excluded[built["truncated"]]["status"] == "truncated"
    assert excluded[built["truncated"]]["location"] == f"images/{built['truncated']}"
    assert excluded[built["missing"]]["status"] == "missing"
    assert excluded[built["missing"]]["location"] == ""
    assert excluded[built["orphan"]]["status"] == "no_metadata_row"
    assert report["problems"]["count"] == 3
    assert report["problems"]["bad_fraction"] == pytest.approx(3 / 12)
    assert report["images_found"] == 12  # 11 files with a row (one truncated) + the orphan
    # The report is JSON-serializable as the stage writes it.
    json.dumps(report)


@pytest.mark.parametrize(("limit", "passes"), [(0.25, True), (0.24, False)])
def test_max_bad_fraction_boundary(tmp_path, limit, passes):
    built = _bad_folder(tmp_path)  # 3 problems over 12 rows = 0.25
    cfg = IngestConfig(max_bad_fraction=limit, workers=1)
    if passes:
        manifest, _ = ingest(built["root"], cfg)
        assert len(manifest) == 10
    else:
        with pytest.raises(IngestError):
            ingest(built["root"], cfg)


def test_two_workers_give_the_same_manifest_and_report(tmp_path):
    built = _bad_folder(tmp_path, rgba=True, gray16=True, archive="batch_01.tar.gz")
    one = ingest(built["root"], IngestConfig(max_bad_fraction=0.5, workers=1))
    two = ingest(built["root"], IngestConfig(max_bad_fraction=0.5, workers=2))
    pd.testing.assert_frame_equal(one[0], two[0])
    assert one[1] == two[1]


def test_metadata_without_any_image_is_an_ingest_error(tmp_path):
    built = make_nih_folder(tmp_path / "nih", n_patients=1, images_per_patient=2)
    for path in (built["root"] / "images").iterdir():
        path.unlink()
    with pytest.raises(IngestError, match=built["rows"][0]):
        ingest(built["root"], ONE)


def test_dimensions_stay_integers_when_a_damaged_image_is_excluded(tmp_path):
    built = make_nih_folder(tmp_path / "nih", truncated=True)
    manifest, report = ingest(built["root"], IngestConfig(max_bad_fraction=0.5, workers=1))
    assert report["dimensions"] == {"64x64": 11}
    assert pd.api.types.is_integer_dtype(manifest["width"])


# --- archives --------------------------------------------------------------------------------


def test_archive_is_read_in_place(tmp_path, monkeypatch):
    built = make_nih_folder(tmp_path / "nih", archive="batch_01.tar.gz", archive_count=4)
    root = built["root"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = listing(root)
    manifest, report = ingest(root, ONE)
    assert listing(root) == before, "ingest wrote into the source folder"
    assert listing(cwd) == {}, "ingest wrote into the working directory"

    assert len(built["archived"]) == 4
    assert report["usable"] == 12
    assert report["archives"] == ["batch_01.tar.gz"]
    location = dict(zip(manifest["image_index"], manifest["location"], strict=True))
    sha = dict(zip(manifest["image_index"], manifest["sha256"], strict=True))
    for name in built["archived"]:
        assert not (root / "images" / name).exists()
        assert location[name] == f"batch_01.tar.gz:images/{name}"
        assert sha[name] == hashlib.sha256(built["files"][name]).hexdigest()
    for name in built["loose"]:
        assert location[name] == f"images/{name}"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_nih_archive_with_wrong_md5_is_rejected(tmp_path):
    built = make_nih_folder(tmp_path / "nih", archive="images_001.tar.gz")
    assert _md5(built["archive"]) != sources.NIH_ARCHIVE_MD5["images_001.tar.gz"]
    with pytest.raises(SourceError, match="MD5") as caught:
        ingest(built["root"], ONE)
    assert "images_001.tar.gz" in str(caught.value)
    assert _md5(built["archive"]) in str(caught.value)


def test_nih_archive_with_wrong_md5_accepted_without_verification(tmp_path):
    built = make_nih_folder(tmp_path / "nih", archive="images_001.tar.gz")
    manifest, report = ingest(built["root"], IngestConfig(verify_md5=False, workers=1))
    assert report["md5_checked"] is False
    assert report["usable"] == 12
    assert set(built["archived"]) <= set(manifest["image_index"])


def test_nih_archive_with_matching_md5_is_accepted(tmp_path, monkeypatch):
    built = make_nih_folder(tmp_path / "nih", archive="images_001.tar.gz")
    monkeypatch.setitem(sources.NIH_ARCHIVE_MD5, "images_001.tar.gz", _md5(built["archive"]))
    _, report = ingest(built["root"], ONE)
    assert report["usable"] == 12
    assert report["md5_checked"] is True


def test_other_archive_names_are_not_md5_checked(tmp_path):
    built = make_nih_folder(tmp_path / "nih", archive="images_013.tar.gz")
    items = list(iter_archive(built["archive"], verify_md5=True))
    assert [i.name for i in items] == built["archived"]


def test_damaged_archive_is_a_source_error(tmp_path):
    built = make_nih_folder(tmp_path / "nih", archive="batch_01.tar.gz")
    data = built["archive"].read_bytes()
    built["archive"].write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"batch_01\.tar\.gz"):
        ingest(built["root"], ONE)


def test_iter_archive_skips_non_png_members_and_honours_wanted(tmp_path):
    archive = tmp_path / "mixed.tar.gz"
    png = gray_png(np.random.default_rng(0), 8)
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [("images/a.png", png), ("README.txt", b"hi"), ("images/b.png", png)]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        tar.addfile(_dir("images/sub.png"))  # a directory named like a PNG is no image
    assert [i.name for i in iter_archive(archive)] == ["a.png", "b.png"]
    only = list(iter_archive(archive, wanted={"b.png"}))
    assert [(i.name, i.location, i.read()) for i in only] == [
        ("b.png", "mixed.tar.gz:images/b.png", png)
    ]


def _dir(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE
    return member


# --- the stage script ------------------------------------------------------------------------


def test_stage_writes_manifest_and_report(tmp_path, workdir, write_params, run_stage):
    built = make_nih_folder(tmp_path / "nih", layout="v2020", archive="batch_01.tar.gz")
    write_params(workdir, built["root"])
    done = run_stage(workdir, "ingest", ENV)
    assert done.returncode == 0, done.stderr
    manifest = pd.read_csv(workdir / "data/ingest/manifest.csv", dtype=str)
    assert manifest["image_index"].tolist() == sorted(built["rows"])
    report = json.loads((workdir / "reports/ingest.json").read_text())
    assert report["usable"] == 12
    assert report["metadata_layout"] == "nih-v2020"
    assert report["archives"] == ["batch_01.tar.gz"]


def test_stage_failure_exits_nonzero_names_files_and_writes_report(
    tmp_path, workdir, write_params, run_stage
):
    built = _bad_folder(tmp_path)
    write_params(workdir, built["root"])
    done = run_stage(workdir, "ingest", ENV)
    assert done.returncode != 0
    for name in (built["truncated"], built["missing"], built["orphan"]):
        assert name in done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads((workdir / "reports/ingest.json").read_text())
    assert report["problems"]["count"] == 3
    # The git-tracked report carries counts only; names stay with the data (they embed IDs).
    public = (workdir / "reports/ingest.json").read_text()
    details = json.loads((workdir / "data/ingest/details.json").read_text())
    for name in (built["truncated"], built["missing"], built["orphan"]):
        assert name not in public
    assert {p["image_index"] for p in details["problems"]["excluded"]} == {
        built["truncated"],
        built["missing"],
        built["orphan"],
    }
    assert not (workdir / "data/ingest/manifest.csv").exists()


# --- no PHI copied ---------------------------------------------------------------------------

PLANTED = {
    "tEXt": "Patient: ZORBALOVA^KSENIJA",
    "zTXt": "MRN 88231907 ZORBALOVA",
    "iTXt": "Zoë Ørbalová, referred by Dr. Quistgaard",
    "eXIf": "ZORBALOVA KSENIJA",
}


def _planted_png() -> bytes:
    return with_chunks(
        gray_png(np.random.default_rng(1), 16),
        [
            text_chunk("Comment", PLANTED["tEXt"]),
            ztxt_chunk("Description", PLANTED["zTXt"]),
            itxt_chunk("Jane Roe", PLANTED["iTXt"], compressed=True),
            exif_chunk(Artist=PLANTED["eXIf"]),
            text_chunk("Software", "fedcxr-test"),
        ],
    )


def test_describe_chunk_keeps_what_the_checks_need_and_never_the_text():
    chunks = scan_chunks(_planted_png()).chunks
    described = [describe_chunk(c, KEY) for c in chunks]
    text = json.dumps(described, ensure_ascii=False)
    for planted in PLANTED.values():
        for word in planted.split():
            if len(word) > 4:
                assert word.strip(",.") not in text, word
    assert "Jane" not in text and "Roe" not in text  # an unknown keyword is withheld too
    assert [(d["type"], d["keyword"], d["phi"]) for d in described] == [
        ("tEXt", "Comment", True),
        ("zTXt", "Description", True),
        ("iTXt", "<withheld keyword>", True),
        ("eXIf", "", True),
        ("tEXt", "Software", False),
    ]
    assert described[0]["looks_like"] == ["person name (DICOM 'Last^First' form)"]
    assert set(described[1]["looks_like"]) == {"record number", "record number (long digit run)"}
    assert "person name (title)" in described[2]["looks_like"]
    assert described[4]["looks_like"] == []
    assert [d["length"] for d in described] == [len(c.data) for c in chunks]
    # The hash is keyed: same content and key, same hash; another key, another hash.
    again = [describe_chunk(c, KEY)["hmac"] for c in chunks]
    other = [describe_chunk(c, b"z" * 32)["hmac"] for c in chunks]
    assert again == [d["hmac"] for d in described]
    assert not set(again) & set(other)
    assert all(len(h) == 16 for h in again)


def test_manifest_holds_no_chunk_text_no_extra_values_no_non_nih_name(tmp_path):
    odd_name = "KSENIJA_ZORBALOVA_chest.png"
    built = make_nih_folder(
        tmp_path / "nih",
        extra_column=True,
        extra_values={0: "Ksenija Zorbalova"},
        chunks={3: [text_chunk("Author", PLANTED["tEXt"])]},
        file_names={5: odd_name},
        ages={1: "DOB 1950-03-04"},
    )
    with pytest.raises(IngestError) as caught:
        ingest(built["root"], ONE, key=KEY)
    message = str(caught.value)
    assert "ZORBALOVA" not in message.upper()
    assert "1 of 12" in message and "NIH pattern" in message
    manifest, report = ingest(built["root"], IngestConfig(max_bad_fraction=0.1, workers=1), KEY)
    text = manifest.to_csv() + json.dumps(report)
    assert "ZORBALOVA" not in text.upper() and "KSENIJA" not in text.upper()
    assert "1950" not in text
    assert len(manifest) == 11
    assert set(manifest[EXTRA_COLUMN]) == {""}  # the column stays (deid flags it), emptied
    assert report["withheld"]["columns_emptied"] == [EXTRA_COLUMN]
    assert report["withheld"]["non_nih_names"] == 1
    [excluded] = report["problems"]["excluded"]
    assert excluded["status"] == "non_nih_name"
    assert excluded["image_index"].startswith("name-")
    assert excluded["location"] == "<withheld>"
    # Same key, same stand-in (reproducible outputs); the name itself cannot be recovered.
    again = ingest(built["root"], IngestConfig(max_bad_fraction=0.1, workers=1), KEY)[1]
    assert again["problems"]["excluded"] == [excluded]
    ages = dict(zip(manifest["image_index"], manifest["raw_age"], strict=True))
    assert ages[built["rows"][1]] == "<withheld>"


def test_stage_without_a_secret_fails_naming_the_variable(
    tmp_path, workdir, write_params, run_stage
):
    built = make_nih_folder(tmp_path / "nih")
    write_params(workdir, built["root"])
    done = run_stage(workdir, "ingest")
    assert done.returncode != 0
    assert SECRET_ENV in done.stderr
    assert "Traceback" not in done.stderr
    assert not (workdir / "data/ingest/manifest.csv").exists()
