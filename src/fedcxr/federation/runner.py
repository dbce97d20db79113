"""Federated training end to end: per-site trainers, site processes and the aggregator's run."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from opacus.accountants import RDPAccountant

from fedcxr import audit as ev
from fedcxr.audit import AuditLog, verify
from fedcxr.config import Params
from fedcxr.federation.aggregator import FederationError, FederationState, run_aggregator, serve
from fedcxr.federation.site import run_site
from fedcxr.models import MODELS, build_model, num_classes_for
from fedcxr.pki import CA_CERT, TlsBundle, ensure_federation, load_bundle, verify_chain
from fedcxr.sitedata import IMAGES, INDEX, SiteData
from fedcxr.stageio import atomic_path, unshare, write_json, write_text_atomic
from fedcxr.strategies import get_strategy
from fedcxr.train.data import XrayDataset, make_loader
from fedcxr.train.loop import (
    evaluate_auroc,
    load_plain_state_dict,
    make_private,
    make_setup,
    pick_device,
    plain_state_dict,
    predict,
    seed_everything,
    threads_per_process,
    train_epoch,
)
from fedcxr.transport import file_sha256, write_state_file

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

AUDIT = "audit.jsonl"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
HISTORY = "history.json"
PARAMS = "params.yaml"  # the resolved params the site processes read
ACCOUNTANT_FILE = "accountant.json"
SERVER_CN = "aggregator"
SITE_SEED_MODULUS = 100_003
# Keys that may change between a run and its resume (more rounds, another port, speed knobs).
RESUMABLE_CHANGES = frozenset(
    {"fl.rounds", "fl.host", "fl.port", "fl.round_timeout_s", "train.num_workers"}
)
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# Site processes get at least this long to start (import torch, open their data) and join:
# start-up time says nothing about a round, so it is not held to fl.round_timeout_s.
JOIN_TIMEOUT_S = 600.0


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


def check_names(params: Params) -> None:
    """Every registry name the federation resolves exists (model.arch, fl.strategy): call it
    before touching any output, so a typo never costs a run."""
    if params.model.arch not in MODELS:
        raise ValueError(
            f"unknown model.arch {params.model.arch!r}; expected one of the registered models "
            f"{sorted(MODELS)}"
        )
    get_strategy(params.fl.strategy)


def round_config(params: Params) -> dict[str, Any]:
    """What the aggregator announces each round; sites check it against their own params."""
    return {
        "rounds": params.fl.rounds,
        "local_epochs": params.fl.local_epochs,
        "fedprox_mu": params.fl.fedprox_mu,
    }


class SiteTrainer:
    """A site's local training, built once per site process; call it as run_site's train_fn.

    Holds the site's data, model, optimizer and (with dp.enabled) ONE Opacus PrivacyEngine for
    the whole run, its noise calibrated for fl.rounds x fl.local_epochs epochs, so epsilon
    composes across rounds.

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
        loader = make_loader(
            train_ds, cfg.batch_size, shuffle=True, seed=self.seed, num_workers=cfg.num_workers
        )
        self.val_loader = make_loader(
            val_ds, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers
        )
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
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path}: not a saved accountant history ({exc}); expected "
                '{"site": ..., "by_round": {"<round>": [[noise, sample_rate, steps], ...]}}'
            ) from None
        self._spent = spent
        log.info("%s: restored DP accountant (rounds %s) from %s", self.name, sorted(spent), path)

    def _save_accountant(self, rnd: int) -> None:
        if self.engine is None:
            return
        history = self.engine.accountant.history
        self._spent[rnd] = [(float(nm), float(sr), int(n)) for nm, sr, n in history]
        path = self._accountant_path()
        if path is None:
            return
        by_round = {str(r): [list(h) for h in hist] for r, hist in sorted(self._spent.items())}
        write_json(path, {"site": self.name, "by_round": by_round})

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
        accountant = RDPAccountant()
        accountant.history = [
            *self.engine.accountant.history,
            (self.noise_multiplier, self.sample_rate, steps),
        ]
        return float(accountant.get_epsilon(self.params.dp.delta))

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
        stats = [
            train_epoch(self.setup, self.train_loader, prox_center=center, prox_mu=self.prox_mu)
            for _ in range(self.params.fl.local_epochs)
        ]
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
                epsilon=float(self.engine.get_epsilon(delta)),
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


# ---------------------------------------------------------------------- site process


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


# ---------------------------------------------------------------------- aggregator side


def find_sites(sites_dir: Path) -> list[str]:
    """Names of the site folders (holding images.npy and index.csv) under `sites_dir`."""
    if not sites_dir.is_dir():
        raise FileNotFoundError(f"sites folder {sites_dir} not found (run the partition stage)")
    names = sorted(
        p.name for p in sites_dir.iterdir() if (p / IMAGES).is_file() and (p / INDEX).is_file()
    )
    if not names:
        raise FileNotFoundError(f"{sites_dir}: expected site folders with {IMAGES} and {INDEX}")
    return names


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "enrich":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_training_keys(params: Params, out_dir: Path) -> list[str]:
    """Params keys (other than RESUMABLE_CHANGES) that differ from the run saved in out_dir."""
    path = out_dir / PARAMS
    if not path.is_file():
        return []
    a = _flat(yaml.safe_load(path.read_text()) or {})
    b = _flat(params.model_dump(mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if k not in RESUMABLE_CHANGES]


def _write_params(params: Params, out_dir: Path, resuming: bool) -> Path:
    """Save the resolved params beside the outputs; refuse a resume under changed training keys."""
    path = out_dir / PARAMS
    new = params.model_dump(mode="json")
    if resuming and path.is_file():
        changed = changed_training_keys(params, out_dir)
        if changed:
            raise FederationError(
                f"{out_dir / CHECKPOINT} was trained with other params ({', '.join(changed)} "
                f"changed since {path}); to start a new federation, move {out_dir} aside (the "
                "training stage moves it to runs-archive/ itself)"
            )
    write_text_atomic(path, yaml.safe_dump(new, sort_keys=True))
    return path


def prepare_federation(
    params: Params,
    sites: list[str],
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    hosts: tuple[str, ...] = (),
) -> tuple[FederationState, Path]:
    """PKI, resolved params, initial model, audit log and FederationState; (state, params file)."""
    check_names(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_federation(pki_dir, sites, SERVER_CN, hosts=hosts)
    checkpoint = out_dir / CHECKPOINT
    resuming = resume and checkpoint.exists()
    if checkpoint.exists() and not resume:
        raise FederationError(
            f"{checkpoint} already exists: pass resume=True (--resume) to continue that "
            "federation, or remove it to start a new one"
        )
    params_file = _write_params(params, out_dir, resuming)
    for stale in out_dir.rglob(".*.tmp"):  # atomic writes cut short by a kill (stageio)
        stale.unlink()
    if not resuming:  # a new federation: site accountants start from zero
        shutil.rmtree(out_dir / "sites", ignore_errors=True)
    seed_everything(params.seed)
    model = build_model(
        params.model.arch,
        num_classes_for(params.task),
        params.model.pretrained,
        dp_safe=params.dp.enabled,
    )
    audit = AuditLog(out_dir / AUDIT)
    holder: dict[str, FederationState] = {}

    def audit_dp(rnd: int, _state: State) -> None:
        record = holder["state"].history[-1]
        for site, outcome in record["sites"].items():
            metrics = outcome.get("metrics") or {}
            if "epsilon" in metrics:
                audit.append(
                    ev.DP_ACCOUNTING,
                    round=rnd,
                    site=site,
                    **{k: metrics[k] for k in ev.EVENT_FIELDS[ev.DP_ACCOUNTING][2:]},
                )

    state = FederationState(
        plain_state_dict(model),
        sites=sites,
        rounds=params.fl.rounds,
        strategy=params.fl.strategy,
        round_config=round_config(params),
        audit=audit,
        checkpoint=checkpoint,
        resume=resume,
        on_round_completed=audit_dp,
    )
    holder["state"] = state
    return state, params_file


def _weighted(pairs: list[tuple[int, Any]]) -> float | None:
    pairs = [(n, v) for n, v in pairs if isinstance(v, int | float) and math.isfinite(v)]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def summarize(state: FederationState, out_dir: Path, wall_s: float) -> dict[str, Any]:
    """Write model.safetensors and history.json; the run's summary (per round and per site)."""
    final = state.global_state()
    state.close()
    with atomic_path(out_dir / MODEL) as tmp:
        write_state_file(tmp, final)
    history = state.history
    write_json(out_dir / HISTORY, history)
    per_round = []
    for record in history:
        sites: dict[str, Any] = {}
        for site, o in record["sites"].items():
            m = o.get("metrics") or {}
            sites[site] = {
                "accepted": o.get("accepted", False),
                "n_k": o.get("n_k", 0),
                "train_loss": m.get("train_loss"),
                "val_auroc": m.get("val_auroc"),
                "bytes_to_site": o.get("bytes_sent", 0),
                "bytes_from_site": o.get("bytes_received", 0),
                "epoch_seconds": m.get("epoch_seconds"),
                **({"epsilon": m["epsilon"]} if "epsilon" in m else {}),
            }
        ok = [s for s in sites.values() if s["accepted"]]
        per_round.append(
            {
                "round": record["round"],
                "wall_s": record["wall_s"],
                "val_auroc": _weighted([(s["n_k"], s["val_auroc"]) for s in ok]),
                "train_loss": _weighted([(s["n_k"], s["train_loss"]) for s in ok]),
                "sites": sites,
            }
        )
    audit = verify(out_dir / AUDIT)
    return {
        "rounds": len(history),
        "strategy": state.strategy.name,
        "sites": list(state.sites),
        "per_round": per_round,
        "final_val_auroc": per_round[-1]["val_auroc"] if per_round else None,
        "model_sha256": file_sha256(out_dir / MODEL),
        "audit_ok": audit.ok,
        "audit_last_hash": audit.last_hash,
        "wall_s": round(wall_s, 3),
    }


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _dial_host(host: str) -> str:
    host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    return f"[{host}]" if ":" in host else host


def _server_hosts(host: str) -> tuple[str, ...]:
    return () if host in _WILDCARD_HOSTS else (host,)


def run_federation(
    params: Params,
    sites_dir: Path,
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    poll_s: float = 2.0,
    grace_s: float = 5.0,
    join_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Aggregator in this process, one `fedcxr site run` process per site folder; the summary.

    Each site process is handed only its own folder, certificate and key. Site logs go to
    out_dir/logs/<site>.log (appended across resumes). A site that exits early, a round that
    runs past fl.round_timeout_s from its start, or sites that have not joined within
    `join_timeout_s` (default: max(fl.round_timeout_s, JOIN_TIMEOUT_S)) stop the federation
    (all site processes killed) with a FederationError naming the round and the silent sites.
    """
    if join_timeout_s is None:
        join_timeout_s = max(float(params.fl.round_timeout_s), JOIN_TIMEOUT_S)
    started = time.monotonic()
    sites = find_sites(sites_dir)
    state, params_file = prepare_federation(
        params, sites, out_dir, pki_dir, resume=resume, hosts=_server_hosts(params.fl.host)
    )
    if state.finished:
        return summarize(state, out_dir, time.monotonic() - started)
    server, port = serve(
        state, load_bundle(pki_dir, SERVER_CN), params.fl.host, params.fl.port, poll_s=poll_s
    )
    address = f"{_dial_host(params.fl.host)}:{port}"
    (out_dir / "logs").mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for site in sites:
            logs[site] = out_dir / "logs" / f"{site}.log"
            cmd = [
                sys.executable, "-m", "fedcxr.cli", "site", "run",
                "--aggregator", address,
                "--ca", str(pki_dir / CA_CERT),
                "--cert", str(pki_dir / f"{site}.pem"),
                "--key", str(pki_dir / f"{site}.key"),
                "--data", str(sites_dir / site),
                "--params", str(params_file),
                "--n-sites", str(len(sites)),
                "--state", str(out_dir / "sites" / site),
            ]  # fmt: skip
            unshare(logs[site])  # appended across resumes; never written through a link
            with logs[site].open("ab") as fh:
                fh.write(f"--- site process started for round {state.round}\n".encode())
                fh.flush()
                procs[site] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        seen, since = (state.round, state.round_open), time.monotonic()
        while not state.wait(timeout=0.5):
            for site, proc in procs.items():
                if proc.poll() is not None:
                    raise FederationError(
                        f"site process {site} exited with code {proc.returncode} in round "
                        f"{state.round} ({state.describe()}); end of {logs[site]}:\n"
                        f"{_tail(logs[site])}"
                    )
            phase = (state.round, state.round_open)  # a new round, or the sites all joined
            if phase != seen:
                seen, since = phase, time.monotonic()
                continue
            waited = time.monotonic() - since
            silent = ", ".join(state.silent_sites()) or "none"
            if state.round_open and waited > params.fl.round_timeout_s:
                raise FederationError(
                    f"round {state.round} ran past fl.round_timeout_s="
                    f"{params.fl.round_timeout_s} s without an update from {silent} "
                    f"({state.describe()}); site logs in {out_dir / 'logs'}"
                )
            if not state.round_open and waited > join_timeout_s:
                raise FederationError(
                    f"round {state.round} could not start: {silent} did not join within "
                    f"{join_timeout_s:g} s ({state.describe()}); site logs in {out_dir / 'logs'}"
                )
        for site, proc in procs.items():
            try:
                code = proc.wait(timeout=60 + 2 * poll_s)
            except subprocess.TimeoutExpired:
                raise FederationError(
                    f"site process {site} did not exit after the federation finished"
                ) from None
            if code != 0:
                raise FederationError(
                    f"site process {site} exited with code {code} after the last round; end of "
                    f"{logs[site]}:\n{_tail(logs[site])}"
                )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        server.stop(grace_s).wait()
        state.stop_watching()
    return summarize(state, out_dir, time.monotonic() - started)


def serve_aggregator(
    params: Params,
    sites: list[str],
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    host: str | None = None,
    port: int | None = None,
    on_ready: Any = None,
) -> dict[str, Any]:
    """The aggregator alone (sites run elsewhere): serve until finished; the summary."""
    started = time.monotonic()
    host = params.fl.host if host is None else host
    port = params.fl.port if port is None else port
    state, _ = prepare_federation(
        params, sites, out_dir, pki_dir, resume=resume, hosts=_server_hosts(host)
    )
    if not state.finished:
        run_aggregator(
            state,
            load_bundle(pki_dir, SERVER_CN),
            host,
            port,
            timeout_s=float(params.fl.round_timeout_s) * params.fl.rounds,
            on_ready=on_ready,
        )
    return summarize(state, out_dir, time.monotonic() - started)
