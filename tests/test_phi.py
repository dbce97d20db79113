"""No PHI persisted: PHI planted in PNG chunks, a CSV column and a file name reaches no file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from dvcrepo import commit_all, pipeline_copy, repo_params
from nihfolder import (
    EXTRA_COLUMN,
    SECRET_ENV,
    TEST_SECRET,
    exif_chunk,
    itxt_chunk,
    make_nih_folder,
    text_chunk,
    ztxt_chunk,
)

SOURCE = Path("data/raw/nih")  # the input folder: the one place the planted PHI may be
ODD_NAME = "WINTERBOTHAM_DELPHINE_chest.png"
# Where each plant goes, what it is, and the strings (whole and in parts) searched for.
PLANTS: dict[str, tuple[str, ...]] = {
    "tEXt": ("Ksenija Zorbalova", "Zorbalova", "Ksenija"),
    "zTXt": ("MRN 88231907 Quillfeather", "88231907", "Quillfeather"),
    "iTXt": ("Zoë Brackenbury-Ørsted", "Brackenbury", "Ørsted"),
    "eXIf": ("Halvard Pettersdottir", "Pettersdottir", "Halvard"),
    "column": ("Ottoline Trengrouse", "Trengrouse", "Ottoline"),
    "file name": (ODD_NAME, "WINTERBOTHAM", "DELPHINE"),
}
ZLIB_HEADERS = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")
# Not marked slow: three `dvc repro` runs of the data stages on 40 tiny images take 15-20 s.


def _plant(root: Path) -> dict:
    """A 40-image NIH folder, one image per patient, with every plant in place."""
    return make_nih_folder(
        root,
        n_patients=40,
        images_per_patient=1,
        size=32,
        extra_column=True,
        extra_values={0: PLANTS["column"][0]},
        file_names={5: ODD_NAME},
        chunks={
            2: [text_chunk("Author", PLANTS["tEXt"][0])],
            3: [ztxt_chunk("Comment", PLANTS["zTXt"][0])],
            4: [itxt_chunk("PatientName", PLANTS["iTXt"][0], compressed=True)],
            6: [exif_chunk(Artist=PLANTS["eXIf"][0])],
        },
    )


def _forms(needle: str) -> set[bytes]:
    """The needle as bytes in every form a leak could take: UTF-8, Latin-1, UTF-16, JSON's
    \\u escapes; in its own, lower and upper case (haystacks are searched lower-cased too)."""
    forms = set()
    for text in {needle, needle.lower(), needle.upper()}:
        for encoding in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            with contextlib.suppress(UnicodeEncodeError):
                forms.add(text.encode(encoding))
        forms.add(json.dumps(text)[1:-1].encode("ascii"))
    return forms


def _inflated(data: bytes) -> list[bytes]:
    """data, and every zlib stream found in it (git objects, PNG chunks, compressed copies)."""
    out = [data]
    for header in ZLIB_HEADERS:
        start = data.find(header)
        while start != -1:
            with contextlib.suppress(zlib.error):
                out.append(zlib.decompressobj().decompress(data[start:], 1 << 26))
            start = data.find(header, start + 1)
    return out


def _found(roots: list[Path], skip: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """For each planted string, the files (or file paths) under roots that hold it."""
    hits: dict[str, list[str]] = {}
    needles = {n: _forms(n) for plant in PLANTS.values() for n in plant}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if any(path.is_relative_to(s) for s in skip):
                continue
            haystacks = [str(path.relative_to(root)).encode("utf-8")]
            haystacks += _inflated(path.read_bytes())
            lowered = [h.lower() for h in haystacks]
            for needle, forms in needles.items():
                if any(f in h or f.lower() in h for f in forms for h in haystacks + lowered):
                    hits.setdefault(needle, []).append(str(path))
    return hits


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[SECRET_ENV] = TEST_SECRET
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _set_params(repo: Path, **sections: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params[name] |= values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def planted_repo(tmp_path: Path) -> Path:
    """A git + DVC repository of the pipeline whose NIH folder carries the plants."""
    repo = pipeline_copy(tmp_path / "repo", repo_params())
    # DVC's own index of hashed files (its "site cache", /var/tmp/dvc by default) kept here.
    (repo / ".dvc" / "config.local").write_text(
        f"[core]\n    site_cache_dir = {tmp_path / 'dvc-site-cache'}\n"
    )
    _set_params(
        repo,
        data={"source": "nih", "nih_dir": str(SOURCE)},
        ingest={"workers": 1},
        resize={"size": 32, "shard_images": 16, "workers": 1},
        train={"image_size": 32},  # must stay <= resize.size
        # 39 usable images (the oddly named one is withheld): sizes that fit exactly.
        partition={"strategy": "iid", "test_size": 9, "site_sizes": [6, 6, 6, 6, 6]},
    )
    _plant(repo / SOURCE)
    return commit_all(repo)


def _assert_nothing_persisted(repo: Path, console: list[subprocess.CompletedProcess]) -> None:
    hits = _found([repo], skip=(repo / SOURCE,))
    assert not hits, f"planted PHI found in: {hits}"
    for result in console:
        text = result.stdout + result.stderr
        leaked = [n for plant in PLANTS.values() for n in plant if n.lower() in text.lower()]
        assert not leaked, f"planted PHI {leaked} on the console of {result.args}"
    # DVC's site cache indexes the files it hashed by path, the input folder's included: it
    # holds the input's file names (as the input itself does) and never their content.
    site_cache = repo.parent / "dvc-site-cache"
    content_hits = {
        n: files for n, files in _found([site_cache]).items() if n not in PLANTS["file name"]
    }
    assert not content_hits, f"planted PHI in DVC's site cache: {content_hits}"


def test_planted_phi_reaches_no_output_cache_report_or_log(planted_repo: Path):
    repo = planted_repo
    # The search finds every plant where it is (compressed chunks included), so an empty
    # result below means something.
    assert set(_found([repo / SOURCE])) == {n for plant in PLANTS.values() for n in plant}

    # 1. Defaults: the non-NIH file name stops ingest, which names it by stand-in only.
    first = _run(["dvc", "repro", "partition"], repo)
    assert first.returncode != 0
    assert "non-NIH" in first.stderr or "NIH pattern" in first.stderr, first.stderr
    assert "name-" in first.stderr
    _assert_nothing_persisted(repo, [first])

    # 2. deid.on_violation fail: ingest withholds the odd file, deid refuses the rest.
    _set_params(repo, ingest={"max_bad_fraction": 0.05})
    second = _run(["dvc", "repro", "partition"], repo)
    assert second.returncode != 0
    assert EXTRA_COLUMN in second.stderr, second.stderr
    report = json.loads((repo / "reports/deid.json").read_text())
    assert report["passed"] is False
    chunks = report["checks"]["png_chunks"]
    assert chunks["by_type"] == {"eXIf": 1, "iTXt": 1, "tEXt": 1, "zTXt": 1}
    assert chunks["violations"]["count"] == 4
    assert [v["column"] for v in report["checks"]["columns"]["violations"]] == [EXTRA_COLUMN]
    assert not (repo / "data/deid/metadata.csv").exists()
    assert any((repo / ".dvc/cache").rglob("*")), "ingest's outputs were not cached"
    _assert_nothing_persisted(repo, [first, second])

    # 3. deid.on_violation scrub: every data stage runs; still nothing persisted, anywhere,
    # including git once the results are committed.
    _set_params(repo, deid={"on_violation": "scrub"})
    third = _ok(_run(["dvc", "repro", "partition"], repo))
    for stage in ("deid", "resize", "partition"):
        assert f"Running stage '{stage}'" in third.stdout
    report = json.loads((repo / "reports/deid.json").read_text())
    assert report["scrubbed"] is True
    assert "removed 4 PHI-bearing PNG chunk(s)" in report["actions"]
    assert json.loads((repo / "reports/partition.json").read_text())["total_images"] == 39
    _ok(_run(["git", "add", "-A"], repo))
    _ok(_run(["git", "commit", "-qm", "results"], repo))
    _assert_nothing_persisted(repo, [first, second, third])
