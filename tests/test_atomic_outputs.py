"""Outputs are replaced, never modified in place (so a DVC cache object is never written
through), and a run making room for another is set aside, never deleted."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcxr.checkpoint import load_checkpoint, save_checkpoint
from fedcxr.federation.audit import AuditLog, verify
from fedcxr.runs import RunCard, archive_name, in_dvc_cache, read_run, set_aside, write_run
from fedcxr.stageio import atomic_path, unshare, write_json, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
WHEN = dt.datetime(2026, 11, 27, 9, 30, 12, tzinfo=dt.UTC)


def card() -> RunCard:
    return RunCard(
        config="federated",
        task="multilabel",
        seed=7,
        arch="smallcnn",
        dp_safe=False,
        image_size=32,
        epochs=2,
        time_per_epoch_s=0.1,
        train_wall_s=1.0,
        comm_bytes=10,
        comm_kind="grpc_wire",
        world_size=3,
        n_train=48,
    )


# ------------------------------------------------------------------ atomic writes, unshare


def test_atomic_replace_never_writes_through_a_hard_link(tmp_path: Path) -> None:
    target = tmp_path / "out" / "summary.json"
    write_json(target, {"round": 1})
    cached = tmp_path / "cache-object"
    os.link(target, cached)  # what `dvc checkout` with cache.type hardlink leaves
    write_json(target, {"round": 2})
    write_text_atomic(tmp_path / "out" / "params.yaml", "a: 1\n")
    assert cached.read_text() == '{\n  "round": 1\n}\n'
    assert target.read_text() == '{\n  "round": 2\n}\n'
    assert target.stat().st_nlink == 1 and oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.parent.iterdir()) == ["params.yaml", "summary.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_unshare_copies_only_links(tmp_path: Path) -> None:
    own = tmp_path / "own.log"
    own.write_text("a\n")
    assert unshare(own) is False and unshare(tmp_path / "missing") is False
    linked, other = tmp_path / "linked.log", tmp_path / "other"
    linked.write_text("b\n")
    os.link(linked, other)
    assert unshare(linked) is True
    assert linked.stat().st_nlink == 1 and other.stat().st_nlink == 1
    assert linked.read_text() == other.read_text() == "b\n"
    real, link = tmp_path / "real", tmp_path / "link.log"
    real.write_text("c\n")
    link.symlink_to(real)
    assert unshare(link) is True
    assert not link.is_symlink() and link.read_text() == "c\n"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="symlink to a missing file"):
        unshare(dangling)


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_audit_append_and_checkpoint_never_reach_a_linked_file(tmp_path: Path, link: str) -> None:
    run = tmp_path / "run"
    log = AuditLog(run / "audit.jsonl")
    log.append("site_joined", site="site-a", cert_fingerprint="ab")
    save_checkpoint(run / "checkpoint.safetensors", {"w": torch.ones(3)}, 1, {"strategy": "x"})
    cached: dict[str, Path] = {}
    for name in ("audit.jsonl", "checkpoint.safetensors"):
        cached[name] = tmp_path / f"cache-{name}"
        os.replace(run / name, cached[name])  # the file moves into the "cache" and links back
        if link == "hardlink":
            os.link(cached[name], run / name)
        else:
            (run / name).symlink_to(cached[name])
    before = {name: path.read_bytes() for name, path in cached.items()}
    log.append("round_completed", round=1)  # the same writer, after the link appeared
    AuditLog(run / "audit.jsonl").append("round_completed", round=2)  # a resumed writer
    save_checkpoint(run / "checkpoint.safetensors", {"w": torch.zeros(3)}, 2, {"strategy": "x"})
    assert {name: path.read_bytes() for name, path in cached.items()} == before
    result = verify(run / "audit.jsonl")
    assert result.ok and result.entries == 3
    assert (run / "audit.jsonl").read_bytes().startswith(before["audit.jsonl"])
    assert load_checkpoint(run / "checkpoint.safetensors").round == 2
    assert not (run / "audit.jsonl").is_symlink() and (run / "audit.jsonl").stat().st_nlink == 1


# ------------------------------------------------------------------ a real DVC cache


def dvc(workdir: Path, *args: str) -> None:
    done = subprocess.run(
        [*DVC, *args], cwd=workdir, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"


def cache_objects(repo: Path) -> dict[Path, str]:
    """Every object of the DVC cache and the MD5 of its content."""
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {
        p: hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("cache_type", ["hardlink", "symlink"])
def test_dvc_cache_objects_stay_intact_after_appends_and_rewrites(
    tmp_path: Path, cache_type: str
) -> None:
    dvc(tmp_path, "init", "--no-scm", "-q")
    dvc(tmp_path, "config", "cache.type", cache_type)
    run = tmp_path / "run"
    log = AuditLog(run / "audit.jsonl")
    log.append("site_joined", site="site-a", cert_fingerprint="ab")
    save_checkpoint(run / "checkpoint.safetensors", {"w": torch.ones(4)}, 1, {"strategy": "x"})
    write_json(run / "history.json", [{"round": 1}])
    write_run(run, {"w": torch.ones(4)}, card())
    dvc(tmp_path, "add", "run")
    dvc(tmp_path, "checkout", "--relink")
    audit = run / "audit.jsonl"
    assert audit.is_symlink() if cache_type == "symlink" else audit.stat().st_nlink > 1
    objects = cache_objects(tmp_path)
    # Each object's name is the MD5 of its content (a folder's listing ends in .dir).
    assert len(objects) == 6
    assert all(p.parent.name + p.name.removesuffix(".dir") == md5 for p, md5 in objects.items())

    log.append("round_completed", round=1)
    AuditLog(audit).append("federation_finished")
    save_checkpoint(run / "checkpoint.safetensors", {"w": torch.zeros(4)}, 2, {"strategy": "x"})
    write_json(run / "history.json", [{"round": 1}, {"round": 2}])
    write_run(run, {"w": torch.zeros(4)}, card())

    assert cache_objects(tmp_path) == objects  # nothing in the cache changed
    assert verify(audit).ok and verify(audit).entries == 3
    state, _ = read_run(run)
    assert torch.equal(state["w"], torch.zeros(4))


# ------------------------------------------------------------------ setting a run aside


def make_run(folder: Path, *, audit: bool = True) -> None:
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "site-a.log").write_text("log\n")
    (folder / "checkpoint.safetensors").write_bytes(b"ckpt")
    if audit:
        (folder / "audit.jsonl").write_text("{}\n")


EVIDENCE = ("checkpoint.safetensors", "audit.jsonl")


def test_set_aside_moves_evidence_to_the_archive(tmp_path: Path) -> None:
    run, archive = tmp_path / "models" / "s7", tmp_path / "runs-archive" / "federated"
    make_run(run)
    where = set_aside(run, archive, "multilabel-s7", evidence=EVIDENCE, now=lambda: WHEN)
    assert where == archive / "multilabel-s7-20261127T093012Z"
    assert not run.exists()
    assert (where / "checkpoint.safetensors").read_bytes() == b"ckpt"
    assert (where / "audit.jsonl").read_text() == "{}\n"
    assert (where / "logs" / "site-a.log").read_text() == "log\n"
    make_run(run)  # the same second again: a new name, nothing overwritten
    again = set_aside(run, archive, "multilabel-s7", evidence=EVIDENCE, now=lambda: WHEN)
    assert again == archive / "multilabel-s7-20261127T093012Z-2"
    assert sorted(p.name for p in archive.iterdir()) == [where.name, again.name]


def test_set_aside_removes_only_what_is_kept_elsewhere(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    assert set_aside(tmp_path / "absent", archive, "x", evidence=EVIDENCE) is None
    nothing = tmp_path / "nothing"
    (nothing / "logs").mkdir(parents=True)
    assert set_aside(nothing, archive, "x", evidence=EVIDENCE) is None and not nothing.exists()
    cached = tmp_path / "cached"
    make_run(cached)
    assert set_aside(cached, archive, "x", evidence=EVIDENCE, elsewhere=lambda p: True) is None
    assert not cached.exists() and not archive.exists()
    half = tmp_path / "half"
    make_run(half)  # the checkpoint is in the cache, the audit log is not: keep both
    kept = set_aside(
        half, archive, "x", evidence=EVIDENCE, elsewhere=lambda p: p.name != "audit.jsonl"
    )
    assert kept is not None and (kept / "audit.jsonl").is_file()


def test_set_aside_keeps_copies_of_symlinked_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    obj = tmp_path / "cache-object"
    obj.write_bytes(b"model")
    (run / "model.safetensors").symlink_to(obj)
    where = set_aside(run, tmp_path / "archive", "x", evidence=EVIDENCE, now=lambda: WHEN)
    assert where is not None
    assert not (where / "model.safetensors").is_symlink()
    assert (where / "model.safetensors").read_bytes() == b"model"


def test_archive_name_needs_an_aware_time() -> None:
    assert archive_name("pneumonia-s1", WHEN) == "pneumonia-s1-20261127T093012Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        archive_name("x", dt.datetime(2026, 1, 1))


def test_stage_counts_only_dvc_cache_objects_as_kept_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "audit.jsonl").write_text("{}\n")
    monkeypatch.chdir(outside)
    assert in_dvc_cache()(outside / "audit.jsonl") is False  # not a DVC repository
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc(repo, "init", "--no-scm", "-q")
    (repo / "added.jsonl").write_text("one\n")
    (repo / "new.jsonl").write_text("two\n")
    dvc(repo, "add", "added.jsonl")
    monkeypatch.chdir(repo)
    cached = in_dvc_cache()
    assert cached(repo / "added.jsonl") is True
    assert cached(repo / "new.jsonl") is False
