"""DP accounting (fedcxr.train.accounting): Opacus' PRV and RDP against Google's
dp-accounting, the prv default, calibration, and the site's saved history read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import dp_accounting
import pytest
import yaml
from dp_accounting import pld, rdp
from fedsites import N_TRAIN, make_sites

from fedcxr.config import ConfigError, DPConfig, Params, load_params, parse_params
from fedcxr.federation.protocol import round_config
from fedcxr.federation.site_trainer import ACCOUNTANT_FILE, SiteTrainer
from fedcxr.train import accounting
from fedcxr.train.loop import plain_state_dict

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
# A site of the paper's size: N = 20,000, B = 32 -> Opacus' Poisson rate 1 / ceil(N / B).
BATCHES = 625
Q = 1 / BATCHES
# (sigma, epochs) -> measured epsilon at delta 1e-5: (Opacus RDP, Opacus PRV, dp-accounting PLD)
# 1.0, 5: 0.8244, 0.4380, 0.4360 | 1.0, 20: 1.0963, 0.8971, 0.8945 | 0.8, 5: 1.4544, 0.7758, 0.7721
CASES = [(1.0, 5), (1.0, 20), (0.8, 5)]


def google(sigma: float, steps: int, accountant: dp_accounting.PrivacyAccountant) -> float:
    """dp-accounting's epsilon after `steps` Poisson-subsampled Gaussian steps (rate Q)."""
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(DELTA))


@pytest.fixture(scope="module")
def figures() -> dict[tuple[float, int], dict[str, float]]:
    """Every case by the four accountants (about 5 s in all, PRV and PLD ~1 s a case)."""
    out = {}
    for sigma, epochs in CASES:
        history = [(sigma, Q, epochs * BATCHES)]
        out[sigma, epochs] = {
            "prv": accounting.epsilon(history, DELTA, "prv"),
            "rdp": accounting.epsilon(history, DELTA, "rdp"),
            "pld": google(sigma, epochs * BATCHES, pld.PLDAccountant()),
            "google_rdp": google(sigma, epochs * BATCHES, rdp.RdpAccountant()),
        }
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"sigma{s}-{e}ep" for s, e in CASES])
def test_prv_matches_googles_pld_accountant_within_one_percent(figures, case):
    eps = figures[case]
    assert eps["prv"] == pytest.approx(eps["pld"], rel=0.01), eps
    assert eps["prv"] >= eps["pld"] * (1 - 1e-3), eps  # an upper bound, not an estimate below


@pytest.mark.parametrize("case", CASES, ids=[f"sigma{s}-{e}ep" for s, e in CASES])
def test_rdp_matches_googles_rdp_accountant_and_prv_is_tighter(figures, case):
    eps = figures[case]
    assert eps["rdp"] == pytest.approx(eps["google_rdp"], rel=0.01), eps
    assert eps["prv"] <= eps["rdp"], eps


def test_the_measured_case(figures):
    """N = 20,000, B = 32, 5 epochs, sigma 1, delta 1e-5: RDP 0.824, PLD 0.436 (measured)."""
    eps = figures[1.0, 5]
    assert eps["rdp"] == pytest.approx(0.824, abs=5e-4)
    assert eps["pld"] == pytest.approx(0.436, abs=5e-4)
    assert eps["prv"] < 0.6 * eps["rdp"]


def test_prv_is_the_default_everywhere():
    assert DPConfig().accountant == "prv"
    assert Params().dp.accountant == "prv"
    assert yaml.safe_load((REPO / "params.yaml").read_text())["dp"]["accountant"] == "prv"
    assert load_params(REPO / "params.yaml").dp.accountant == "prv"
    literal = DPConfig.model_fields["accountant"].annotation
    assert set(get_args(literal)) == set(accounting.ACCOUNTANTS)


def test_an_unknown_accountant_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'dp\.accountant'") as info:
        parse_params({"dp": {"accountant": "gdp"}}, "params.yaml")
    assert "params.yaml" in str(info.value)
    for call in (
        lambda: accounting.make_accountant("gdp"),
        lambda: accounting.epsilon([(1.0, Q, 10)], DELTA, "gdp"),
        lambda: accounting.noise_multiplier(1.0, DELTA, Q, 10, "gdp"),
    ):
        with pytest.raises(ValueError, match=r"dp.accountant: expected one of \['prv', 'rdp'\]"):
            call()


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_of_a_history_does_not_depend_on_how_it_was_split(kind):
    """Rounds append entries; the projected epsilon appends one more: same figure as one entry.
    A JSON round trip (lists, not tuples) gives the same epsilon too."""
    whole = accounting.epsilon([(1.0, Q, 3 * BATCHES)], DELTA, kind)
    rounds = [(1.0, Q, BATCHES)] * 3
    assert accounting.epsilon(rounds, DELTA, kind) == whole
    assert accounting.epsilon(json.loads(json.dumps(rounds)), DELTA, kind) == whole
    assert accounting.epsilon([], DELTA, kind) == 0.0
    assert accounting.make_accountant(kind, rounds).history == [(1.0, Q, 3 * BATCHES)]


@pytest.mark.parametrize(("kind", "target"), [("prv", 1.0), ("prv", 4.0), ("rdp", 1.0)])
def test_calibrated_noise_reaches_the_target_within_tolerance(kind, target):
    steps = 5 * BATCHES
    sigma = accounting.noise_multiplier(target, DELTA, Q, steps, kind)
    eps = accounting.epsilon([(sigma, Q, steps)], DELTA, kind)
    assert target * (1 - accounting.CALIBRATION_TOLERANCE) <= eps <= target, (sigma, eps)
    if kind == "prv":  # the tighter accountant needs less noise for the same target
        rdp_sigma = accounting.noise_multiplier(target, DELTA, Q, steps, "rdp")
        assert 0.5 * rdp_sigma < sigma < rdp_sigma


def test_prv_eps_error_scales_with_the_rdp_epsilon():
    small = accounting.prv_eps_error([(1.0, Q, BATCHES)], DELTA)
    huge = accounting.prv_eps_error([(0.3, Q, 100 * BATCHES)], DELTA)
    assert accounting.PRV_MIN_EPS_ERROR <= small < huge == accounting.PRV_MAX_EPS_ERROR


# ---------------------------------------------------------------------- the site's saved history


def tiny_params(folder: Path, **dp: object) -> Params:
    data = {
        "seed": 7,
        "resize": {"size": 32},
        "model": {"arch": "smallcnn"},
        "train": {"image_size": 32, "batch_size": 8, "augment": False, "lr": 1e-3},
        "fl": {"rounds": 2, "local_epochs": 1},
        "dp": {"enabled": True, "noise_multiplier": 1.0, **dp},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(data))
    return load_params(folder / "params.yaml")


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_site_saves_its_history_and_a_restarted_site_reads_the_same_epsilon(tmp_path, kind):
    sites = make_sites(tmp_path / "sites")
    params = tiny_params(tmp_path / "p", accountant=kind)
    config = {"strategy": params.fl.strategy, **round_config(params)}
    trainer = SiteTrainer(sites / "site-a", params, state_dir=tmp_path / "state")
    state1, _, metrics = trainer(plain_state_dict(trainer.setup.model), 1, config)
    assert metrics["accountant"] == kind
    saved = json.loads((tmp_path / "state" / ACCOUNTANT_FILE).read_text())
    assert saved["accountant"] == kind
    assert saved["by_round"] == {"1": [[1.0, 0.5, 2]]}  # q = 1 / ceil(16 / 8), 2 steps
    assert N_TRAIN == 16
    assert metrics["epsilon"] == accounting.epsilon(saved["by_round"]["1"], DELTA, kind) > 0
    restarted = SiteTrainer(sites / "site-a", params, state_dir=tmp_path / "state")
    _, _, again = restarted(state1, 2, config)
    assert again["epsilon"] == accounting.epsilon([(1.0, 0.5, 4)], DELTA, kind)
    assert again["epsilon"] > metrics["epsilon"]
    other = "rdp" if kind == "prv" else "prv"  # the history is the same for either kind
    params = tiny_params(tmp_path / "q", accountant=other)
    relabelled = SiteTrainer(sites / "site-a", params, state_dir=tmp_path / "state")
    relabelled._start_round(2)
    assert relabelled.engine.accountant.history == [(1.0, 0.5, 2)]
    assert relabelled.epsilon() == accounting.epsilon([(1.0, 0.5, 2)], DELTA, other)
