"""De-identification: PHI in PNG chunks and columns, Safe Harbor ages, keyed pseudonyms, secrets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nihfolder import (
    EXTRA_COLUMN,
    PHI_COMMENT,
    PHI_NAME,
    SECRET_ENV,
    TEST_SECRET,
    make_nih_folder,
)

from fedcxr.config import DeidConfig, IngestConfig, load_params
from fedcxr.deid import (
    OUTPUT_COLUMNS,
    DeidError,
    Secret,
    deidentify,
    pseudonym,
    resolve_secret,
)
from fedcxr.ingest import ingest
from fedcxr.phiscan import phi_reasons

FAIL = DeidConfig(on_violation="fail")
SCRUB = DeidConfig(on_violation="scrub")
KEY = Secret(b"k" * 32, "test key", development=False)
OTHER_KEY = Secret(b"z" * 32, "other test key", development=False)
# Fragments of the planted PHI that must never reach a de-identification output or report.
PHI_FRAGMENTS = ("Jane", "Doe", "DOE", "JANE", "Person ")
STAGES = Path(__file__).resolve().parents[1] / "stages"


def _manifest(root: Path, **kwargs) -> tuple[pd.DataFrame, dict]:
    built = make_nih_folder(root, **kwargs)
    manifest, _ = ingest(built["root"], IngestConfig(workers=1))
    return manifest, built


def _image_ids(manifest: pd.DataFrame, key: Secret = KEY) -> dict[str, str]:
    return {n: pseudonym(key.key, "image", n) for n in manifest["image_index"]}


def _assert_no_raw_identifiers(text: str, built: dict) -> None:
    for pid in built["patient_ids"]:
        assert pid not in text, f"raw patient ID {pid} leaked"
    for name in built["rows"]:
        assert name not in text, f"raw image name {name} leaked"
        assert name[:8] not in text, f"raw zero-padded patient ID of {name} leaked"
        assert name.removesuffix(".png") not in text


@pytest.fixture
def phi(tmp_path) -> tuple[pd.DataFrame, dict]:
    return _manifest(tmp_path / "nih", phi_text=True, harmless_text=True, extra_column=True)


# --- violations ------------------------------------------------------------------------------


def test_png_text_patient_name_is_a_redacted_violation(phi):
    manifest, built = phi
    # Ingest describes the chunks without their text; deid still finds the PHI.
    described = json.loads(manifest.set_index("image_index").loc[built["phi_text"], "chunks"])
    assert [(c["type"], c["keyword"], c["phi"]) for c in described] == [
        ("tEXt", "Author", True),
        ("tEXt", "Comment", True),
    ]
    assert all(
        set(c) == {"type", "keyword", "length", "phi", "looks_like", "hmac"} for c in described
    )
    for fragment in (PHI_NAME, PHI_COMMENT, *PHI_FRAGMENTS):
        assert fragment not in manifest.to_csv()
    with pytest.raises(DeidError) as caught:
        deidentify(manifest, FAIL, KEY)
    report = caught.value.report
    ids = _image_ids(manifest)
    chunks = report["checks"]["png_chunks"]
    listed = chunks["violations"]["listed"]
    assert chunks["violations"]["count"] == 2
    assert {(v["image_id"], v["chunk"], v["keyword"]) for v in listed} == {
        (ids[built["phi_text"]], "tEXt", "Author"),
        (ids[built["phi_text"]], "tEXt", "Comment"),
    }
    for violation in listed:
        assert violation["content"].startswith("<redacted")
        assert violation["looks_like"]
    by_keyword = {v["keyword"]: v for v in listed}
    assert by_keyword["Author"]["looks_like"] == [
        "person name or identifier (keyword names a person or patient)"
    ]
    assert any("Last^First" in r for r in by_keyword["Comment"]["looks_like"])
    # The harmless Software chunk is looked at but is no violation.
    assert ids[built["harmless_text"]] not in {v["image_id"] for v in listed}
    assert chunks["by_type"] == {"tEXt": 3}
    assert chunks["images_with_chunks"] == 2

    text = json.dumps(report, ensure_ascii=False)
    assert PHI_NAME not in text
    assert PHI_COMMENT not in text
    for fragment in PHI_FRAGMENTS:
        assert fragment not in text
    _assert_no_raw_identifiers(text, built)


def test_extra_column_is_a_violation_naming_the_column(phi):
    manifest, _ = phi
    with pytest.raises(DeidError, match=EXTRA_COLUMN) as caught:
        deidentify(manifest, FAIL, KEY)
    error = caught.value
    assert "3 de-identification violation(s)" in str(error)
    columns = error.report["checks"]["columns"]
    assert [v["column"] for v in columns["violations"]] == [EXTRA_COLUMN]
    assert EXTRA_COLUMN in columns["looked_at"]
    assert error.report["passed"] is False
    assert error.report["violations"] == 3


def test_harmless_text_alone_passes(tmp_path):
    manifest, _ = _manifest(tmp_path / "nih", harmless_text=True)
    clean, report = deidentify(manifest, FAIL, KEY)
    assert report["passed"] is True
    assert report["violations"] == 0
    assert report["actions"] == []
    assert report["scrubbed"] is False
    assert report["checks"]["png_chunks"]["by_type"] == {"tEXt": 1}
    assert len(clean) == 12


def test_time_chunk_and_non_nih_file_name_are_violations(clean_folder):
    manifest, _ = ingest(clean_folder["root"], IngestConfig(workers=1))
    assert deidentify(manifest, FAIL, KEY)[1]["passed"] is True
    manifest = manifest.copy()
    # A tIME chunk as ingest describes it; deid adds the date reason from its type alone.
    manifest.loc[0, "chunks"] = json.dumps(
        [{"type": "tIME", "keyword": "", "length": 7, "phi": False, "looks_like": [], "hmac": ""}]
    )
    manifest.loc[1, "image_index"] = "DOE_JANE_chest.png"
    with pytest.raises(DeidError) as caught:
        deidentify(manifest, FAIL, KEY)
    report = caught.value.report
    assert report["violations"] == 2
    assert report["checks"]["file_names"]["violations"]["count"] == 1
    listed = report["checks"]["png_chunks"]["violations"]["listed"]
    assert [v["chunk"] for v in listed] == ["tIME"]
    assert listed[0]["looks_like"] == ["date (tIME: last-modification time)"]
    assert listed[0]["content"] == "<redacted, 7 bytes>"
    assert "2019-03-04" not in json.dumps(report)
    assert "DOE_JANE" not in json.dumps(report)


# --- scrub -----------------------------------------------------------------------------------


def test_scrub_passes_with_only_output_columns_and_records_actions(phi, tmp_path):
    manifest, built = phi
    clean, report = deidentify(manifest, SCRUB, KEY)
    assert list(clean.columns) == list(OUTPUT_COLUMNS)
    assert report["output_columns"] == list(OUTPUT_COLUMNS)
    assert report["passed"] is False
    assert report["scrubbed"] is True
    assert report["violations"] == 3
    assert f"dropped column(s) [{EXTRA_COLUMN!r}]" in report["actions"]
    assert "removed 2 PHI-bearing PNG chunk(s)" in report["actions"]

    path = tmp_path / "metadata.csv"
    clean.to_csv(path, index=False, lineterminator="\n")
    text = path.read_text()
    assert text.splitlines()[0] == ",".join(OUTPUT_COLUMNS)
    for fragment in (*PHI_FRAGMENTS, "fedcxr-test", "Software", "Author"):
        assert fragment not in text
    _assert_no_raw_identifiers(text, built)
    for fragment in PHI_FRAGMENTS:
        assert fragment not in json.dumps(report, ensure_ascii=False)


def test_output_rows_map_back_to_the_manifest(phi):
    manifest, _ = phi
    clean, _ = deidentify(manifest, SCRUB, KEY)
    assert clean["manifest_row"].tolist() == list(range(len(manifest)))
    for row in clean.itertuples():
        source = manifest.iloc[row.manifest_row]
        assert row.image_id == pseudonym(KEY.key, "image", source["image_index"])
        assert row.patient_id == pseudonym(KEY.key, "patient", source["patient_id"])
        assert row.follow_up == source["follow_up"]
        assert row.sex == source["sex"]
        for finding in ("Atelectasis", "Hernia", "Pneumothorax"):
            assert getattr(row, finding) == source[finding]
    # One pseudonym per patient, and images of one patient share it.
    pairs = set(zip(manifest["patient_id"], clean["patient_id"], strict=True))
    assert len(pairs) == manifest["patient_id"].nunique() == clean["patient_id"].nunique()
    assert clean["image_id"].is_unique


# --- ages ------------------------------------------------------------------------------------


def test_ages_over_89_become_90_and_impossible_ones_are_flagged(tmp_path):
    ages = {0: "90", 1: "95", 2: "414", 3: "abc", 4: "89", 5: "058Y", 6: "-3"}
    manifest, built = _manifest(tmp_path / "nih", ages=ages)
    clean, report = deidentify(manifest, FAIL, KEY)
    ids = _image_ids(manifest)
    names = built["rows"]
    age = dict(zip(clean["image_id"], clean["age"], strict=True))
    assert age[ids[names[0]]] == 90
    assert age[ids[names[1]]] == 90
    assert np.isnan(age[ids[names[2]]])
    assert np.isnan(age[ids[names[3]]])
    assert age[ids[names[4]]] == 89
    assert age[ids[names[5]]] == 58
    assert np.isnan(age[ids[names[6]]])
    assert clean["age"].max() == 90

    over = report["checks"]["ages"]["over_limit"]
    assert over["count"] == 2
    assert {o["image_id"] for o in over["listed"]} == {ids[names[0]], ids[names[1]]}
    assert all(o["reported_age"] == 90 for o in over["listed"])
    impossible = report["checks"]["ages"]["impossible"]
    assert {(i["image_id"], i["value"]) for i in impossible["listed"]} == {
        (ids[names[2]], "414"),
        (ids[names[3]], "<withheld>"),  # text in the age column is never shown
        (ids[names[6]], "-3"),
    }
    assert report["warnings"]["count"] == 3
    [warning] = report["warnings"]["listed"]
    assert warning["check"] == "ages.impossible"
    assert warning["count"] == 3
    assert "3 impossible age(s)" in warning["message"]
    assert "capped 2 ages at 90" in report["actions"]
    assert report["passed"] is True  # capping is an action, not a violation


# --- pseudonyms and secrets ------------------------------------------------------------------


def test_pseudonyms_stable_for_a_secret_and_different_for_another(phi):
    manifest, _ = phi
    first, _ = deidentify(manifest, SCRUB, KEY)
    again, _ = deidentify(manifest.copy(), SCRUB, Secret(b"k" * 32, "same", development=False))
    pd.testing.assert_frame_equal(first, again)
    other, _ = deidentify(manifest, SCRUB, OTHER_KEY)
    assert not set(first["image_id"]) & set(other["image_id"])
    assert not set(first["patient_id"]) & set(other["patient_id"])


def test_pseudonym_shape():
    value = pseudonym(b"secret", "patient", "23417")
    assert value == pseudonym(b"secret", "patient", "23417")
    assert value.startswith("p")
    assert len(value) == 16
    assert pseudonym(b"secret", "image", "23417").startswith("i")
    assert pseudonym(b"secret", "image", "23417")[1:] != value[1:]
    assert pseudonym(b"secret", "patient", "23418") != value


def test_resolve_secret_synthetic_uses_the_flagged_development_key():
    secret = resolve_secret(DeidConfig(), synthetic=True, environ={})
    assert secret.development is True
    assert "development" in secret.source
    # Even with a real key in the environment the synthetic default keeps the dev key.
    with_env = resolve_secret(DeidConfig(), synthetic=True, environ={SECRET_ENV: TEST_SECRET})
    assert with_env.key == secret.key


def test_resolve_secret_nih_without_a_secret_fails_naming_the_variable():
    with pytest.raises(DeidError, match=SECRET_ENV):
        resolve_secret(DeidConfig(), synthetic=False, environ={})
    with pytest.raises(DeidError, match="MY_KEY"):
        resolve_secret(DeidConfig(secret_env="MY_KEY"), synthetic=False, environ={SECRET_ENV: "x"})
    with pytest.raises(DeidError, match=SECRET_ENV):
        resolve_secret(DeidConfig(), synthetic=False, environ={SECRET_ENV: ""})


def test_resolve_secret_nih_uses_the_environment_variable():
    secret = resolve_secret(DeidConfig(), synthetic=False, environ={SECRET_ENV: TEST_SECRET})
    assert secret.key == TEST_SECRET.encode()
    assert secret.development is False
    assert SECRET_ENV in secret.source
    assert TEST_SECRET not in secret.source
    assert TEST_SECRET not in repr(secret)


def test_resolve_secret_file(tmp_path):
    key_file = tmp_path / "deid.key"
    key_file.write_text(TEST_SECRET + "\n")
    cfg = DeidConfig(secret_file=str(key_file))
    secret = resolve_secret(cfg, synthetic=False, environ={})
    assert secret.key == TEST_SECRET.encode()
    assert secret.development is False
    key_file.write_text("short\n")
    with pytest.raises(DeidError, match="64 hexadecimal digits") as caught:
        resolve_secret(cfg, synthetic=False, environ={})
    assert str(key_file) in str(caught.value)
    assert "openssl rand -hex 32" in str(caught.value)
    with pytest.raises(DeidError, match="does not exist"):
        resolve_secret(DeidConfig(secret_file=str(tmp_path / "nope")), False, environ={})


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("x", "1 characters of text that is not hexadecimal"),
        ("hospital1", "9 characters of text that is not hexadecimal"),
        ("correct horse battery staple, twice", "not hexadecimal (a passphrase)"),
        ("ab" * 31, "62 hexadecimal digits"),
    ],
)
def test_weak_keys_are_refused_naming_the_variable_and_the_fix(value, found):
    with pytest.raises(DeidError) as caught:
        resolve_secret(DeidConfig(), synthetic=False, environ={SECRET_ENV: value})
    message = str(caught.value)
    assert SECRET_ENV in message
    assert found in message
    assert "openssl rand -hex 32" in message
    if len(value) > 2:
        assert value not in message  # the key is never echoed


def test_strong_keys_are_accepted_as_given():
    hex_key = "A1" * 32
    secret = resolve_secret(DeidConfig(), synthetic=False, environ={SECRET_ENV: f" {hex_key}\n"})
    assert secret.key == hex_key.encode()  # used as written: existing pseudonyms stay
    assert secret.source == f"environment variable {SECRET_ENV}"
    assert hex_key not in repr(secret)


def test_binary_key_file_needs_32_bytes(tmp_path):
    key_file = tmp_path / "deid.key"
    cfg = DeidConfig(secret_file=str(key_file))
    key_file.write_bytes(bytes(range(128, 160)))  # 32 bytes, not text
    assert resolve_secret(cfg, synthetic=False, environ={}).key == bytes(range(128, 160))
    key_file.write_bytes(bytes(range(128, 159)))
    with pytest.raises(DeidError, match=r"found 31 bytes of binary data"):
        resolve_secret(cfg, synthetic=False, environ={})


def test_report_holds_no_value_derived_from_the_key_but_pseudonyms(phi):
    """Two keys: once pseudonyms are mapped back to what they stand for, the reports are equal,
    so nothing else in them depends on the key (nothing to test key guesses against)."""
    manifest, _ = phi
    first_key = Secret(bytes.fromhex(TEST_SECRET), "one source", development=False)
    second_key = Secret(b"\x07" * 32, "one source", development=False)

    def unkeyed(secret: Secret) -> str:
        _, report = deidentify(manifest, SCRUB, secret)
        text = json.dumps(report, sort_keys=True)
        for row in manifest.itertuples():
            text = text.replace(pseudonym(secret.key, "image", row.image_index), "IMAGE")
            text = text.replace(pseudonym(secret.key, "patient", row.patient_id), "PATIENT")
        return text

    first, second = unkeyed(first_key), unkeyed(second_key)
    assert first == second
    assert "secret_id" not in first and "key_id" not in first


def test_manifest_with_chunk_text_from_an_older_ingest_is_refused_without_echoing_it(phi):
    manifest, _ = phi
    old = manifest.copy()
    old.loc[3, "chunks"] = json.dumps([{"type": "tEXt", "keyword": "Author", "text": PHI_NAME}])
    with pytest.raises(DeidError, match="older ingest") as caught:
        deidentify(old, SCRUB, KEY)
    assert PHI_NAME not in str(caught.value)


def test_unknown_chunk_keyword_is_withheld_in_the_report(tmp_path):
    manifest, _ = _manifest(tmp_path / "nih")
    manifest.loc[0, "chunks"] = json.dumps(
        [{"type": "tEXt", "keyword": "Jane Doe", "length": 9, "phi": True, "looks_like": []}]
    )
    with pytest.raises(DeidError) as caught:
        deidentify(manifest, FAIL, KEY)
    [listed] = caught.value.report["checks"]["png_chunks"]["violations"]["listed"]
    assert listed["keyword"] == "<withheld keyword>"
    assert listed["looks_like"] == ["flagged by ingest"]
    assert "Jane" not in json.dumps(caught.value.report)


# --- phi_reasons -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("DOE^JANE", "person name (DICOM 'Last^First' form)"),
        ("Patient: DOE^JANE", "person name (DICOM 'Last^First' form)"),
        ("Dr. Smith", "person name (title)"),
        ("referred by Mrs Jones", "person name (title)"),
        ("name: Jane", "person name ('name:' label)"),
        ("2019-03-04", "date"),
        ("03/04/2019", "date"),
        ("20190304", "date"),
        ("March 4, 2019", "date"),
        ("MRN 1234567", "record number"),
        ("id 12345678", "record number (long digit run)"),
        ("123-45-6789", "social security number"),
        ("(555) 123-4567", "phone number"),
        ("jane.doe@example.org", "e-mail address"),
    ],
)
def test_phi_reasons_detects(text, label):
    assert label in phi_reasons("Comment", text)


def test_phi_reasons_person_keyword():
    assert phi_reasons("Author", "Jane Doe") == [
        "person name or identifier (keyword names a person or patient)"
    ]
    assert phi_reasons("PatientName", "x")
    assert phi_reasons("Author", "   ") == []


@pytest.mark.parametrize(
    ("keyword", "text"),
    [("Software", "fedcxr-test"), ("Comment", "PA view"), ("Description", "chest 1024x1024")],
)
def test_phi_reasons_harmless(keyword, text):
    assert phi_reasons(keyword, text) == []


@pytest.mark.parametrize("text", ["03/14/2019", "Study 12/31/2019"])
def test_phi_reasons_detects_us_month_day_dates(text):
    assert "date" in phi_reasons("Comment", text)


# --- the stage script ------------------------------------------------------------------------


def test_stage_after_ingest_writes_report_and_metadata(tmp_path, workdir, write_params, run_stage):
    built = make_nih_folder(tmp_path / "nih", phi_text=True, harmless_text=True, extra_column=True)
    write_params(workdir, built["root"])
    env = {SECRET_ENV: TEST_SECRET}
    # Ingest keys its hashes with the pseudonymization secret: refused without one.
    no_secret = run_stage(workdir, "ingest")
    assert no_secret.returncode != 0
    assert SECRET_ENV in no_secret.stderr
    assert not (workdir / "data/ingest/manifest.csv").exists()
    assert run_stage(workdir, "ingest", env).returncode == 0

    # Real data without a secret: refused, naming the variable.
    no_secret = run_stage(workdir, "deid")
    assert no_secret.returncode != 0
    assert SECRET_ENV in no_secret.stderr

    # Violations with on_violation fail: non-zero exit, report written, no metadata.
    failed = run_stage(workdir, "deid", env)
    assert failed.returncode != 0
    assert EXTRA_COLUMN in failed.stderr
    report = json.loads((workdir / "reports/deid.json").read_text())
    assert report["passed"] is False
    assert not (workdir / "data/deid/metadata.csv").exists()

    write_params(workdir, built["root"], deid={"on_violation": "scrub"})
    done = run_stage(workdir, "deid", env)
    assert done.returncode == 0, done.stderr
    report_text = (workdir / "reports/deid.json").read_text()
    report = json.loads(report_text)
    assert report["scrubbed"] is True
    assert report["images"] == 12
    patient_ids = report["checks"]["patient_ids"]
    assert patient_ids["secret"] == f"environment variable {SECRET_ENV}"
    assert patient_ids["development_secret"] is False
    assert "secret_id" not in patient_ids
    assert TEST_SECRET not in report_text
    for fragment in PHI_FRAGMENTS:
        assert fragment not in report_text

    metadata_text = (workdir / "data/deid/metadata.csv").read_text()
    metadata = pd.read_csv(workdir / "data/deid/metadata.csv", dtype={"patient_id": str})
    assert list(metadata.columns) == list(OUTPUT_COLUMNS)
    assert len(metadata) == 12
    _assert_no_raw_identifiers(metadata_text, built)
    for fragment in PHI_FRAGMENTS:
        assert fragment not in metadata_text
    manifest = pd.read_csv(workdir / "data/ingest/manifest.csv", dtype=str, keep_default_na=False)
    # The planted PHI reached deid as descriptions only: the manifest (a DVC output, so also
    # in .dvc/cache) holds neither the chunk text nor the extra column's values, yet deid
    # found both (the report above lists them).
    manifest_text = (workdir / "data/ingest/manifest.csv").read_text()
    for fragment in (PHI_NAME, PHI_COMMENT, *PHI_FRAGMENTS, *built["extra_values"]):
        assert fragment not in manifest_text
    chunks = report["checks"]["png_chunks"]["violations"]
    assert chunks["count"] == 2
    assert [c["column"] for c in report["checks"]["columns"]["violations"]] == [EXTRA_COLUMN]
    assert set(manifest[EXTRA_COLUMN]) == {""}
    for row in metadata.itertuples():
        source = manifest.iloc[row.manifest_row]
        assert row.image_id == pseudonym(TEST_SECRET.encode(), "image", source["image_index"])
        assert row.patient_id == pseudonym(TEST_SECRET.encode(), "patient", source["patient_id"])


def test_stage_console_summary_warns_of_impossible_ages(
    tmp_path, workdir, write_params, monkeypatch, capsys
):
    """An age of 400 passes (it is set to missing) but is a warning on the console and in the
    report, with the raw value shown only when it is a plain number."""
    built = make_nih_folder(tmp_path / "nih", ages={0: "400", 1: "-3", 2: "Jane Doe 1950"})
    params = load_params(write_params(workdir, built["root"]))
    manifest, _ = ingest(built["root"], IngestConfig(workers=1), key=TEST_SECRET.encode())
    (workdir / "data/ingest").mkdir(parents=True)
    manifest.to_csv(workdir / "data/ingest/manifest.csv", index=False)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(SECRET_ENV, TEST_SECRET)
    _stage_module("deid").main(
        params,
        manifest=Path("data/ingest/manifest.csv"),
        out=Path("data/deid"),
        report=Path("reports/deid.json"),
    )

    out = capsys.readouterr().out
    assert "0 violation(s), 3 warning(s), passed=True" in out
    warnings = [line for line in out.splitlines() if line.startswith("deid: warning:")]
    assert len(warnings) == 1
    assert "3 impossible age(s) (missing, negative or over 120)" in warnings[0]
    assert "400" in warnings[0] and "-3" in warnings[0] and "<withheld>" in warnings[0]
    assert "Jane" not in out and "1950" not in out
    report = json.loads((workdir / "reports/deid.json").read_text())
    assert report["passed"] is True
    assert report["warnings"]["count"] == 3
    assert report["warnings"]["listed"][0]["check"] == "ages.impossible"
    assert "Jane" not in json.dumps(report)
    metadata = pd.read_csv(workdir / "data/deid/metadata.csv")
    assert metadata["age"].isna().sum() == 3


def _stage_module(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
