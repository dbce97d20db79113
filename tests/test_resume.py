"""Killed federations through the real stage script: resumed runs equal uninterrupted ones bit
for bit (DP accountant included), a rerun under new params moves the old run aside, a bad
parameter touches nothing, and a run resumed by hand never writes through the DVC cache; and,
in the aggregator core, a resumed server optimizer (fedavgm, fedadam, fedyogi) continues with
the state (m, v) it had, so it ends where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fedsites import (
    N_TRAIN,
    SITES,
    audit_entries,
    kill_stage_when,
    params_dict,
    run_dir,
    run_stage,
    sha256,
    stage_workdir,
)

from fedcxr.checkpoint import load_checkpoint, save_checkpoint
from fedcxr.config import load_params
from fedcxr.federation import FederationError, FederationState
from fedcxr.federation.audit import AuditLog, verify
from fedcxr.federation.resume import SERVER_PREFIX
from fedcxr.federation.runner import (
    CHECKPOINT,
    PARAMS,
    changed_training_keys,
    prepare_federation,
)
from fedcxr.federation.strategies import get_strategy
from fedcxr.federation.summary import AUDIT, MODEL
from fedcxr.federation.transport import state_to_bytes
from fedcxr.train import accounting

slow = pytest.mark.slow  # each federation through the stage is ~30 s of site processes on 2 cores

ROUNDS = 3
REPORT = Path("reports/train")
DVC = [sys.executable, "-m", "dvc"]


def in_round_two(entries: list[dict[str, Any]]) -> bool:
    """Kill as soon as a site's round-2 update arrived: round 1 is checkpointed, round 2 is not
    (unless the other sites were as quick), and that site already spent round 2's budget."""
    return any(e["event"] == "update_received" and e["round"] == 2 for e in entries)


def killed_and_full(root: Path, dp: bool, strategy: str = "fedavg") -> dict[str, Path]:
    dp_section = {"enabled": True, "noise_multiplier": 1.0} if dp else {"enabled": False}
    fl = {"rounds": ROUNDS, "strategy": strategy}
    data = params_dict(fl=fl, train={"augment": True}, dp=dp_section)
    killed = stage_workdir(root / "killed", data)
    kill_stage_when(killed, in_round_two, dp=dp)
    ckpt = load_checkpoint(run_dir(killed, dp) / CHECKPOINT)
    assert 1 <= ckpt.round < ROUNDS, ckpt.round
    full = stage_workdir(root / "full", data)
    done = run_stage(full, dp=dp)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"killed": killed, "full": full}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-round federation SIGKILLed (sites too) in round 2, and the same uninterrupted."""
    return killed_and_full(tmp_path_factory.mktemp("plain"), dp=False)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same with DP-SGD (noise multiplier 1.0): Poisson sampling, noise and accountant."""
    return killed_and_full(tmp_path_factory.mktemp("private"), dp=True)


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The plain federation under FedAdam: server state (m, v) carried across the kill."""
    return killed_and_full(tmp_path_factory.mktemp("adaptive"), dp=False, strategy="fedadam")


def copy_of(workdir: Path, tmp: Path) -> Path:
    target = tmp / workdir.name
    shutil.copytree(workdir, target, symlinks=True)
    return target


def set_params(workdir: Path, **changes: Any) -> None:
    """Edit params.yaml by dotted key (`train.lr=5e-4` as train__lr=5e-4)."""
    path = workdir / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=True))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def report(workdir: Path, dp: bool = False) -> dict[str, Any]:
    family = "federated_dp" if dp else "federated"
    return json.loads((workdir / REPORT / family / "multilabel-s7.json").read_text())


def expected_epsilon(rounds: int, delta: float) -> float:
    """From the site sizes alone: q = 1 / ceil(16 / 8), ceil(16 / 8) steps per epoch (Opacus),
    by the default accountant (dp.accountant: prv)."""
    assert N_TRAIN == 16
    return accounting.epsilon([(1.0, 1 / 2, rounds * 2)], delta, "prv")


def check_resumed(killed: Path, full: Path, tmp: Path, dp: bool) -> Path:
    work = copy_of(killed, tmp)
    out = run_dir(work, dp)
    before = load_checkpoint(out / CHECKPOINT).round
    audit_before = (out / AUDIT).read_bytes()
    done = run_stage(work, dp=dp)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming an interrupted federation" in done.stdout
    # The resumed run continued the chain (appended, nothing rewritten) from the checkpoint.
    audit_after = (out / AUDIT).read_bytes()
    assert audit_after.startswith(audit_before) and verify(out / AUDIT).ok
    entries = audit_entries(out / AUDIT)
    resumed = [e for e in entries if e["event"] == "federation_resumed"]
    assert [e["from_round"] for e in resumed] == [before + 1]
    assert [e["round"] for e in entries if e["event"] == "round_completed"] == [1, 2, 3]
    assert load_checkpoint(out / CHECKPOINT).round == ROUNDS
    # Bit for bit the uninterrupted run: the model, and every per-round figure of the summary.
    assert sha256(out / MODEL) == sha256(run_dir(full, dp) / MODEL)
    assert report(work, dp) == report(full, dp)
    return work


@slow
def test_killed_run_resumes_bit_for_bit(plain: dict[str, Path], tmp_path: Path) -> None:
    check_resumed(plain["killed"], plain["full"], tmp_path, dp=False)


@slow
def test_killed_fedadam_run_resumes_bit_for_bit(adaptive: dict[str, Path], tmp_path: Path) -> None:
    work = check_resumed(adaptive["killed"], adaptive["full"], tmp_path, dp=False)
    saved = load_checkpoint(run_dir(work) / CHECKPOINT)
    assert saved.meta["strategy"] == "fedadam" and saved.meta["server_opt"]["lr"] == 1e-2
    assert any(k.startswith(f"{SERVER_PREFIX}v/") for k in saved.state)


@slow
def test_killed_dp_run_resumes_with_the_accountant_of_an_uninterrupted_run(
    private: dict[str, Path], tmp_path: Path
) -> None:
    work = check_resumed(private["killed"], private["full"], tmp_path, dp=True)
    delta = load_params(work / "params.yaml").dp.delta
    summary = report(work, dp=True)
    for rnd, record in enumerate(summary["per_round"], start=1):
        want = expected_epsilon(rnd, delta)
        for site in SITES:  # epsilon after the restart counts every round exactly once
            assert record["sites"][site]["epsilon"] == pytest.approx(want, rel=1e-9), (rnd, site)


@slow
def test_rerun_under_new_params_moves_the_interrupted_run_aside(
    plain: dict[str, Path], tmp_path: Path
) -> None:
    work = copy_of(plain["killed"], tmp_path)
    out = run_dir(work)
    old = {name: sha256(out / name) for name in (CHECKPOINT, AUDIT, PARAMS)}
    set_params(work, train__lr=5e-4)
    done = run_stage(work)
    assert done.returncode == 0, done.stdout + done.stderr
    archived = list((work / "runs-archive" / "federated").iterdir())
    assert len(archived) == 1
    assert re.fullmatch(r"multilabel-s7-\d{8}T\d{6}Z", archived[0].name), archived[0].name
    assert "params changed (train.lr)" in done.stdout
    assert f"moved to {archived[0].relative_to(work)}" in done.stdout
    # The interrupted run's checkpoint and audit log survive byte for byte, its params beside.
    assert {name: sha256(archived[0] / name) for name in old} == old
    assert verify(archived[0] / AUDIT).ok
    # ... and the new federation started from scratch with a log of its own.
    entries = audit_entries(out / AUDIT)
    assert entries[0]["seq"] == 1 and entries[0]["event"] == "site_joined"
    assert not any(e["event"] == "federation_resumed" for e in entries)
    assert load_checkpoint(out / CHECKPOINT).round == ROUNDS
    assert load_params(out / PARAMS).train.lr == 5e-4


@slow
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("model__arch", "vgg16", "model.arch"), ("fl__strategy", "fedsgd", "fl.strategy")],
)
def test_unknown_name_fails_before_touching_the_interrupted_run(
    plain: dict[str, Path], tmp_path: Path, key: str, value: str, message: str
) -> None:
    work = copy_of(plain["killed"], tmp_path)
    out = run_dir(work)
    before = snapshot(out)
    set_params(work, **{key: value})
    done = run_stage(work)
    assert done.returncode != 0
    assert message in done.stderr and repr(value) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert snapshot(out) == before  # checkpoint, audit log and the rest exactly as they were
    assert not (work / "runs-archive").exists()


@slow
def test_resume_under_changed_training_params_is_refused(
    plain: dict[str, Path], tmp_path: Path
) -> None:
    work = copy_of(plain["killed"], tmp_path)
    out = run_dir(work)
    before = snapshot(out)
    params = load_params(work / "params.yaml")
    lr = params.model_copy(update={"train": params.train.model_copy(update={"lr": 5e-4})})
    more = params.model_copy(update={"fl": params.fl.model_copy(update={"rounds": 5})})
    assert changed_training_keys(lr, out) == ["train.lr"]
    assert changed_training_keys(more, out) == []  # more rounds: a resume may add them
    with pytest.raises(FederationError, match=r"other params \(train\.lr changed since") as err:
        prepare_federation(lr, list(SITES), out, work / "pki", resume=True)
    assert str(out / CHECKPOINT) in str(err.value)
    assert snapshot(out) == before


def dvc(workdir: Path, *args: str) -> str:
    done = subprocess.run(
        [*DVC, *args], cwd=workdir, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def cache_objects(workdir: Path) -> dict[Path, str]:
    """Every DVC cache object and the MD5 of its content."""
    root = workdir / ".dvc" / "cache" / "files" / "md5"
    return {
        p: hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@slow
def test_run_resumed_by_hand_never_writes_through_the_dvc_cache(
    plain: dict[str, Path], tmp_path: Path
) -> None:
    work = copy_of(plain["killed"], tmp_path)
    out = run_dir(work)
    dvc(work, "init", "--no-scm", "-q")
    dvc(work, "config", "cache.type", "hardlink")
    dvc(work, "add", str(out.relative_to(work)))
    dvc(work, "checkout", "--relink")
    for name in (AUDIT, CHECKPOINT, PARAMS):  # the workspace files are the cache objects
        assert (out / name).stat().st_nlink > 1, name
    audit_before = (out / AUDIT).read_bytes()
    objects = cache_objects(work)
    assert all(p.parent.name + p.name.removesuffix(".dir") == md5 for p, md5 in objects.items())
    set_params(work, fl__rounds=ROUNDS + 1)  # by hand, with more rounds (issue 8, item 9)
    done = run_stage(work)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every cache object still holds the content its name says; none was written through.
    assert cache_objects(work) == objects
    old_audit = hashlib.md5(audit_before, usedforsecurity=False).hexdigest()
    assert (work / ".dvc/cache/files/md5" / old_audit[:2] / old_audit[2:]).read_bytes() == (
        audit_before
    )
    # The files the resume changed are files of their own; the log continues the old chain.
    changed = [out / AUDIT, out / CHECKPOINT, out / PARAMS, *(out / "logs").iterdir()]
    assert [p.stat().st_nlink for p in changed] == [1] * len(changed)
    assert (out / AUDIT).read_bytes().startswith(audit_before) and verify(out / AUDIT).ok
    assert load_checkpoint(out / CHECKPOINT).round == ROUNDS + 1


# ------------------------------------------------------------ server optimizer state (fast)
#
# The aggregator core driven directly (no gRPC, no site processes): two sites whose "training"
# is a fixed function of the global model, the round and the site, so runs can be compared bit
# for bit. The model has a BatchNorm layer, whose statistics are averaged, not stepped.

CORE_SITES = ("site-a", "site-b")
CORE_N = {"site-a": 30, "site-b": 10}
CORE_ROUNDS = 4


def core_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.ones(4),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    }


def fake_train(state: dict[str, torch.Tensor], rnd: int, site: str) -> dict[str, torch.Tensor]:
    """Deterministic stand-in for local training: a pull towards a site's own optimum."""
    g = torch.Generator().manual_seed(1000 * rnd + CORE_SITES.index(site))
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            target = torch.randn(value.shape, generator=g) * (1 + CORE_SITES.index(site))
            out[key] = value + 0.3 * (target - value)
        else:
            out[key] = value + 5
    return out


def core_state(tmp: Path, strategy: str, **kw: Any) -> FederationState:
    return FederationState(
        core_model(),
        sites=CORE_SITES,
        rounds=CORE_ROUNDS,
        strategy=strategy,
        round_config={},
        audit=AuditLog(tmp / "audit.jsonl"),
        checkpoint=tmp / CHECKPOINT,
        **kw,
    )


def drive(state: FederationState, order: tuple[str, ...] = CORE_SITES) -> dict[str, torch.Tensor]:
    """Join every site, submit each site's update round after round until the federation
    stops; the global model then (the state is closed)."""
    for site in CORE_SITES:
        state.join(site, CORE_N[site], 1, "", "test")
    while not (state.finished or state.halted):
        rnd, current = state.round, state.global_state()
        for site in order:
            payload = state_to_bytes(fake_train(current, rnd, site))
            result = state.submit(site, rnd, CORE_N[site], "{}", payload)
            assert result.accepted, result.reason
    final = state.global_state()
    state.close()
    return final


def uninterrupted(
    tmp: Path, strategy: str, **kw: Any
) -> tuple[FederationState, dict[str, torch.Tensor]]:
    state = core_state(tmp, strategy, **kw)
    final = drive(state)
    assert state.finished
    return state, final


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi"])
@pytest.mark.parametrize("stop_after", [1, 2])
def test_resumed_server_optimizer_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, strategy: str, stop_after: int
) -> None:
    opt = get_strategy(strategy).server_opt(0.05)
    full, want = uninterrupted(tmp_path / "full", strategy, server_opt=opt)
    first = core_state(tmp_path / "killed", strategy, server_opt=opt, stop_after_round=stop_after)
    drive(first, order=tuple(reversed(CORE_SITES)))  # arrival order must not matter either
    assert first.halted and load_checkpoint(tmp_path / "killed" / CHECKPOINT).round == stop_after
    # The checkpoint holds the server state beside the model, and nothing else.
    saved = load_checkpoint(tmp_path / "killed" / CHECKPOINT)
    slots = get_strategy(strategy).slots
    assert {k for k in saved.state if k.startswith(SERVER_PREFIX)} == {
        f"{SERVER_PREFIX}{slot}/{key}" for slot in slots for key in ("conv.weight", "bn.weight")
    }
    assert saved.meta["server_opt"] == opt.to_json()

    second = core_state(tmp_path / "killed", strategy, server_opt=opt, resume=True)
    assert second.round == stop_after + 1
    assert second.server_state.keys() == first.server_state.keys()
    assert all(torch.equal(second.server_state[k], v) for k, v in first.server_state.items())
    final = drive(second)
    assert second.finished
    assert final.keys() == want.keys() == core_model().keys()
    assert all(torch.equal(final[k], want[k]) for k in want)
    assert all(torch.equal(second.server_state[k], full.server_state[k]) for k in full.server_state)
    assert [h.model_sha256 for h in second.history] == [h.model_sha256 for h in full.history]

    # The test has teeth: a resume that forgot the server state would end elsewhere.
    amnesiac = core_state(
        tmp_path / "amnesiac", strategy, server_opt=opt, stop_after_round=stop_after
    )
    drive(amnesiac)
    forgot = core_state(tmp_path / "amnesiac", strategy, server_opt=opt, resume=True)
    forgot.server_state = {}
    assert not torch.equal(drive(forgot)["conv.weight"], want["conv.weight"])


def test_fedavgm_without_momentum_resumes_as_fedavg(tmp_path: Path) -> None:
    opt = get_strategy("fedavgm").server_opt(1.0, momentum=0.0)
    momentum = uninterrupted(tmp_path / "fedavgm", "fedavgm", server_opt=opt)[1]
    plain = uninterrupted(tmp_path / "fedavg", "fedavg")[1]
    assert all(torch.equal(momentum[k], plain[k]) for k in plain)


def test_resume_refuses_other_server_settings_or_a_broken_server_state(tmp_path: Path) -> None:
    opt = get_strategy("fedadam").server_opt()
    first = core_state(tmp_path, "fedadam", server_opt=opt, stop_after_round=1)
    drive(first)
    other = get_strategy("fedadam").server_opt(0.5)
    with pytest.raises(FederationError, match=r"server optimizer settings .*'lr': 0.01.*'lr': 0.5"):
        core_state(tmp_path, "fedadam", server_opt=other, resume=True)
    with pytest.raises(FederationError, match=r"written by strategy 'fedadam'.* uses 'fedyogi'"):
        core_state(tmp_path, "fedyogi", resume=True)
    # A checkpoint whose v lost a tensor (written by hand) names what is missing.
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    state = {k: v for k, v in ckpt.state.items() if k != f"{SERVER_PREFIX}v/bn.weight"}
    save_checkpoint(tmp_path / CHECKPOINT, state, ckpt.round, ckpt.meta)
    with pytest.raises(FederationError, match=r"missing server state \['v/bn.weight'\]"):
        core_state(tmp_path, "fedadam", server_opt=opt, resume=True)
