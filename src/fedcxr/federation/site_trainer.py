"""A site's local training (SiteTrainer, with its DP accountant) and the site-process entry."""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcxr.config import Params
from fedcxr.federation.pki import TlsBundle, load_bundle, verify_chain
from fedcxr.federation.protocol import round_config
from fedcxr.federation.site import run_site
from fedcxr.federation.strategies import get_strategy
from fedcxr.models import build_model, num_classes_for
from fedcxr.sitedata import INDEX, SiteData
from fedcxr.stageio import write_json
from fedcxr.tensorfile import State
from fedcxr.train import accounting
from fedcxr.train.data import XrayDataset, loader_workers, make_loader
from fedcxr.train.loop import (
    evaluate_auroc,
    load_plain_state_dict,
    make_private,
    make_setup,
    pick_device,
    plain_state_dict,
    predict,
    scheduled_lr,
    seed_everything,
    set_lr,
    threads_per_process,
    train_epoch,
)

log = logging.getLogger(__name__)

ACCOUNTANT_FILE = "accountant.json"
SITE_SEED_MODULUS = 100_003


class PrivacyBudgetExhausted(RuntimeError):
    """A site refuses to train a round that would take it past dp.target_epsilon."""


def site_seed(params: Params, site: str) -> int:
    """params.seed plus a stable per-site offset (CRC-32 of the site name), so sites differ."""
    return params.seed + zlib.crc32(site.encode()) % SITE_SEED_MODULUS


def round_seed(seed: int, rnd: int) -> int:
    """The seed of one site's round `rnd` (a site seed mixed with the round by SeedSequence)."""
    if rnd < 1:
        raise ValueError(f"rounds count from 1, found round {rnd}")
    return int(np.random.SeedSequence([seed % 2**63, rnd]).generate_state(1, np.uint64)[0] >> 1)


class SiteTrainer:
    """A site's local training, built once per site process; call it as run_site's train_fn.

    Holds the site's data, model, optimizer and (with dp.enabled) ONE Opacus PrivacyEngine for
    the whole run, its noise calibrated for fl.rounds x fl.local_epochs epochs, so epsilon
    composes across rounds. Every epsilon (reported, projected, calibrated) is computed from
    the accountant's history by dp.accountant (fedcxr.train.accounting), which each
    round's metrics name.

    Each round is a function of (site seed, round, global weights) only: it starts with fresh
    Adam moments, the torch/numpy/python RNGs and the loader's sampling generator reseeded from
    round_seed(site seed, round), and augmentation epochs numbered from (round - 1) x
    fl.local_epochs. A site process restarted between rounds (a resumed federation) therefore
    trains exactly what the uninterrupted one would have, bit for bit.

    DP accounting: the accountant's history after every round is kept per round (and, with
    `state_dir`, saved there before the update is sent), and round r starts from the history
    after round r - 1. A round trained again after a kill repeats the same computation (same
    weights, same seeds, same noise), so its update is the one already released and counting
    it once is exact. If the noise or sample rate changed since that attempt (fl.rounds raised
    under dp.target_epsilon), the attempt's spending is kept as well (conservative).

    Budget policy: with dp.target_epsilon set, a round whose projected epsilon would exceed
    it raises PrivacyBudgetExhausted before any training (the site process then exits non-zero
    and the federation fails with that message) rather than silently skipping rounds.
    """

    def __init__(
        self,
        folder: str | Path,
        params: Params,
        *,
        n_sites: int = 1,
        state_dir: str | Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        get_strategy(params.fl.strategy)  # fail fast on a bad name
        self.accountant_kind = accounting.check_kind(params.dp.accountant)
        self.folder = Path(folder)
        self.name = self.folder.name
        self.params = params
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._spent: dict[int, list[tuple[float, float, int]]] = {}  # round -> history after it
        self.prox_mu = params.fl.fedprox_mu if get_strategy(params.fl.strategy).proximal else 0.0
        self.device = device or pick_device(threads_per_process(n_sites))
        self.seed = site_seed(params, self.name)
        seed_everything(self.seed)
        site = SiteData.open(self.folder)
        cfg = params.train
        train_ds = XrayDataset.from_split(
            [site], "train", params.task, cfg.image_size, augment=cfg.augment, seed=self.seed
        )
        val_ds = XrayDataset.from_split([site], "val", params.task, cfg.image_size)
        if len(train_ds) == 0:
            raise ValueError(f"{self.folder / INDEX}: expected rows with split 'train', found none")
        self.n_train, self.n_val = len(train_ds), len(val_ds)
        # The simulation runs every site's process on this machine: they share its cores.
        workers = loader_workers(cfg.num_workers, processes=n_sites)
        loader = make_loader(
            train_ds, cfg.batch_size, shuffle=True, seed=self.seed, num_workers=workers
        )
        self.val_loader = make_loader(val_ds, cfg.batch_size, shuffle=False, num_workers=workers)
        # No pretrained download at the site: the global weights replace the initial ones.
        model = build_model(
            params.model.arch, num_classes_for(params.task), False, dp_safe=params.dp.enabled
        )
        setup = make_setup(model, cfg, params.task, train_ds.labels, self.device)
        self.engine = None
        if params.dp.enabled:
            epochs_total = params.fl.rounds * params.fl.local_epochs
            setup, loader, self.engine = make_private(setup, loader, params.dp, epochs_total)
            self._restore_accountant()
        self.setup, self.train_loader = setup, loader

    # ------------------------------------------------------------------ DP accounting

    def _accountant_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / ACCOUNTANT_FILE

    def _restore_accountant(self) -> None:
        path = self._accountant_path()
        if self.engine is None or path is None or not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
            if "by_round" not in saved and "history" in saved:  # the one-history format
                saved["by_round"] = {str(saved["round"]): saved["history"]}
            spent = {
                int(rnd): [(float(nm), float(sr), int(n)) for nm, sr, n in history]
                for rnd, history in saved["by_round"].items()
            }
            kind = saved.get("accountant", "rdp")  # files before dp.accountant: rdp
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path}: not a saved accountant history ({exc}); expected "
                '{"site": ..., "by_round": {"<round>": [[noise, sample_rate, steps], ...]}}'
            ) from None
        self._spent = spent
        log.info(
            "%s: restored DP accountant history (rounds %s, saved under %s, read by %s) from %s",
            self.name,
            sorted(spent),
            kind,  # the history is the same for every kind: only epsilon's computation differs
            self.accountant_kind,
            path,
        )

    def _save_accountant(self, rnd: int) -> None:
        if self.engine is None:
            return
        history = self.engine.accountant.history
        self._spent[rnd] = [(float(nm), float(sr), int(n)) for nm, sr, n in history]
        path = self._accountant_path()
        if path is None:
            return
        by_round = {str(r): [list(h) for h in hist] for r, hist in sorted(self._spent.items())}
        write_json(
            path, {"site": self.name, "accountant": self.accountant_kind, "by_round": by_round}
        )

    def _history_before(self, rnd: int) -> list[tuple[float, float, int]]:
        """The accountant's history that round `rnd` starts from (see the class docstring)."""
        if rnd == 1:
            base: list[tuple[float, float, int]] = []
        elif rnd - 1 in self._spent:
            base = list(self._spent[rnd - 1])
        else:
            raise ValueError(
                f"{self.name}: asked to train round {rnd} but holds no DP accountant history "
                f"for round {rnd - 1} (looked in {self._accountant_path() or 'memory only'}); "
                "the privacy spent so far is unknown, so this site will not train. Give the "
                "site its --state folder of the earlier rounds"
            )
        attempt = self._spent.get(rnd)
        if attempt and attempt[-1][:2] != (self.noise_multiplier, self.sample_rate):
            log.warning(
                "%s: round %d was trained before with other noise/sample rate: counted too",
                self.name,
                rnd,
            )
            base = list(attempt)
        return base

    @property
    def sample_rate(self) -> float:
        return float(getattr(self.train_loader, "sample_rate", 0.0))

    @property
    def noise_multiplier(self) -> float:
        return float(getattr(self.setup.optimizer, "noise_multiplier", 0.0))

    def projected_epsilon(self) -> float:
        """Epsilon after one more round (fl.local_epochs epochs of len(loader) steps)."""
        if self.engine is None:
            raise ValueError("projected_epsilon needs dp.enabled")
        steps = len(self.train_loader) * self.params.fl.local_epochs
        planned = (self.noise_multiplier, self.sample_rate, steps)
        return self.epsilon([*self.engine.accountant.history, planned])

    def epsilon(self, history: list[tuple[float, float, int]] | None = None) -> float:
        """Epsilon at dp.delta of `history` (default: the accountant's), by dp.accountant."""
        if self.engine is None:
            raise ValueError("epsilon needs dp.enabled")
        if history is None:
            history = self.engine.accountant.history
        return accounting.epsilon(history, self.params.dp.delta, self.accountant_kind)

    # ------------------------------------------------------------------ one round

    def _start_round(self, rnd: int) -> None:
        """Make round `rnd` a function of (site seed, round, global weights) alone."""
        seed = round_seed(self.seed, rnd)
        seed_everything(seed)  # python, numpy, torch (DP noise and Poisson sampling use it)
        loader = self.train_loader
        for holder in (loader, loader.sampler, loader.batch_sampler):
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(seed)  # shuffling / Poisson sampling of this round
        self.setup.optimizer.state.clear()  # fresh Adam moments, as a restarted site has
        self.setup.epochs_done = (rnd - 1) * self.params.fl.local_epochs
        if self.engine is not None:
            self.engine.accountant.history = self._history_before(rnd)

    def _check_config(self, config: dict[str, Any], rnd: int) -> None:
        mine = {"strategy": get_strategy(self.params.fl.strategy).name, **round_config(self.params)}
        wrong = {k: (config[k], v) for k, v in mine.items() if k in config and config[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: aggregator {a!r}, site {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(
                f"{self.name}: round {rnd} config differs from this site's params ({detail}); "
                "run the site with the federation's params file"
            )

    def __call__(
        self, global_state: State, rnd: int, config: dict[str, Any]
    ) -> tuple[State, int, dict[str, Any]]:
        """Train fl.local_epochs epochs from the global weights; (state, n_k, metrics)."""
        self._check_config(config, rnd)
        self._start_round(rnd)
        target = self.params.dp.target_epsilon
        if self.engine is not None and target is not None:
            projected = self.projected_epsilon()
            if projected > target * (1 + 1e-9):
                raise PrivacyBudgetExhausted(
                    f"{self.name}: round {rnd} would bring epsilon to {projected:.4f}, over "
                    f"dp.target_epsilon={target} (delta={self.params.dp.delta}); stopping"
                )
        load_plain_state_dict(self.setup.model, global_state)
        center = global_state if self.prox_mu > 0 else None
        stats = []
        local, train = self.params.fl.local_epochs, self.params.train
        for j in range(local):
            # The run's learning-rate schedule by cumulative local epoch, as pooled runs have it.
            epoch, total = (rnd - 1) * local + j, self.params.fl.rounds * local
            set_lr(
                self.setup.optimizer,
                scheduled_lr(float(train.lr), min(epoch, total - 1), total, train.lr_schedule),
            )
            stats.append(
                train_epoch(self.setup, self.train_loader, prox_center=center, prox_mu=self.prox_mu)
            )
        examples = sum(s.examples for s in stats)
        loss = sum(s.loss * s.examples for s in stats) / max(examples, 1)
        metrics: dict[str, Any] = {
            "train_loss": float(loss),
            "val_auroc": self.val_auroc(),
            "epoch_seconds": sum(s.seconds for s in stats) / len(stats),
            "steps": sum(s.steps for s in stats),
        }
        if self.engine is not None:
            delta = self.params.dp.delta
            metrics.update(
                epsilon=self.epsilon(),
                accountant=self.accountant_kind,
                delta=delta,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.params.dp.max_grad_norm,
                sample_rate=self.sample_rate,
            )
            self._save_accountant(rnd)
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"{self.name}: round {rnd} train_loss is {loss}")
        return plain_state_dict(self.setup.model), self.n_train, metrics

    def val_auroc(self) -> float | None:
        """Macro AUROC on the site's val split (pneumonia: the one label); None if undefined."""
        if self.n_val == 0:
            return None
        probs, labels = predict(self.setup.model, self.val_loader, self.device)
        return evaluate_auroc(probs, labels)["macro"]


def tls_from_files(ca: Path, cert: Path, key: Path) -> TlsBundle:
    """A site's TlsBundle from its three PEM files; the certificate is checked against the CA."""
    if cert.parent == key.parent and cert.stem == key.stem and key.suffix == ".key":
        return load_bundle(cert.parent, cert.stem, ca=ca)
    pems = {}
    for what, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        try:
            pems[what] = path.read_bytes()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read the site's {what} {path}: {exc}") from None
    verify_chain(pems["certificate"], pems["CA certificate"])
    return TlsBundle(pems["CA certificate"], pems["private key"], pems["certificate"])


def run_site_process(
    address: str,
    tls: TlsBundle,
    data: Path,
    params: Params,
    *,
    n_sites: int = 1,
    state_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """What `fedcxr site run` does: build the SiteTrainer, join, train until STOP."""
    trainer = SiteTrainer(data, params, n_sites=n_sites, state_dir=state_dir)
    return run_site(address, tls, trainer.n_train, trainer.n_val, trainer)
