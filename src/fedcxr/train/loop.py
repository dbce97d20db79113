"""The one training loop (pooled, site-local, federated, DP), prediction, AUROC and DP wrapping."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fedcxr.config import DPConfig, TrainConfig
from fedcxr.labels import FINDINGS
from fedcxr.parallel import available_cores
from fedcxr.train import accounting
from fedcxr.train.augment import model_input
from fedcxr.train.data import pos_weight

ADAM_BETAS = (0.9, 0.999)
OPACUS_PREFIX = "_module."


@dataclass
class TrainSetup:
    """Everything one training process holds; `epochs_done` seeds each epoch's augmentation."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    amp: bool  # CUDA fast path: bf16 autocast + channels_last (off on CPU and under DP)
    epochs_done: int = 0
    compiled: Callable[[Tensor], Tensor] | None = None  # torch.compile(model) (train.compile)


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean data loss per example (the FedProx term is not included)
    examples: int
    steps: int
    seconds: float


# --- device, threads, seeds -----------------------------------------------------------------


def threads_per_process(n_processes: int, cores: int | None = None) -> int:
    """Torch threads for each of n_processes sharing the machine: max(1, cores // n)."""
    if n_processes < 1:
        raise ValueError(f"expected n_processes >= 1, found {n_processes}")
    return max(1, (cores if cores is not None else available_cores()) // n_processes)


def pick_device(threads: int | None = None) -> torch.device:
    """CUDA when available, else CPU with `threads` torch threads (default: all cores)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads if threads is not None else available_cores())
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed python, numpy and torch; deterministic kernels on CPU (default) or when asked."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic is None:
        deterministic = not torch.cuda.is_available()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


PURPOSES = ("train", "predict")


def autocast_dtype(
    device_type: str, purpose: str, bf16_supported: bool = True
) -> torch.dtype | None:
    """The autocast dtype for `purpose` on a device type; None means plain fp32.

    Training on CUDA runs bf16 (with channels_last) when the GPU supports it. Prediction --
    evaluation, operating thresholds, validation AUROC -- always runs in fp32: under bf16 most
    probabilities tie (3,461 of 3,584 on an H100 for one ResNet-50), which costs AUROC and the
    bootstrap their resolution.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"expected purpose in {PURPOSES}, found {purpose!r}")
    if purpose == "train" and device_type == "cuda" and bf16_supported:
        return torch.bfloat16
    return None


def _amp_ok(device: torch.device) -> bool:
    """Whether training on `device` takes the bf16 + channels_last fast path."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return autocast_dtype(device.type, "train", bf16_supported=bf16) is not None


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """Autocast off (also inside a caller's autocast region) and, on CUDA, no TF32 shortcuts.

    cuDNN convolutions default to TF32 on Ampere and later (a 10-bit mantissa); prediction
    for metrics asks for IEEE fp32 in convolutions and matmuls, and restores the settings.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        # torch's fp32_precision API; while inside, the legacy getter cudnn.allow_tf32 raises
        backends = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, saved, strict=True):
                b.fp32_precision = value


# --- setup and the loop ---------------------------------------------------------------------


def make_setup(
    model: nn.Module, cfg: TrainConfig, task: str, labels: np.ndarray, device: torch.device
) -> TrainSetup:
    """Adam(lr, betas 0.9/0.999) and BCE-with-logits (pos_weight for pneumonia) on `device`."""
    amp = _amp_ok(device)
    model = model.to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    weight = pos_weight(task, labels)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if weight is None else weight.to(device))
    if cfg.lr == "auto":
        raise ValueError(
            "train.lr is 'auto': it resolves to the architecture's rate (config.ARCH_LR) when "
            "params are loaded; pass a number to TrainConfig built by hand"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    # The compiled forward shares the model's parameters: weights are read from `model`.
    compiled = torch.compile(model) if cfg.compile else None
    return TrainSetup(model, optimizer, loss_fn, device, amp, compiled=compiled)


def scheduled_lr(base: float, epoch: int, total: int, schedule: str) -> float:
    """The learning rate of 0-based epoch `epoch` of `total`: `constant` keeps `base`; `cosine`
    decays it as base * (1 + cos(pi * epoch / total)) / 2, from base at epoch 0 towards 0."""
    if not 0 <= epoch < total:
        raise ValueError(f"expected 0 <= epoch < total, found epoch {epoch} of {total}")
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / total))
    raise ValueError(f"unknown train.lr_schedule {schedule!r}; expected constant or cosine")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (Opacus' DPOptimizer shares its groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside an Opacus GradSampleModule (or the model itself)."""
    return model._module if isinstance(model, GradSampleModule) else model


def _prox_grad(model: nn.Module, center: dict[str, Tensor], mu: float) -> Callable[[], None]:
    """Adds mu * (w - w_center), the gradient of (mu/2)||w - w_center||^2, to each p.grad."""
    params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    missing = [n for n, _ in params if n not in center]
    if missing:
        raise KeyError(
            f"prox_center lacks parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "expected the plain state_dict (plain_state_dict) of the same architecture"
        )
    pairs = [(p, center[n].to(p.device, p.dtype)) for n, p in params]

    def add() -> None:
        with torch.no_grad():
            for p, c in pairs:
                if p.grad is not None:
                    p.grad.add_(p - c, alpha=mu)

    return add


def _step(optimizer: torch.optim.Optimizer, before_update: Callable[[], None] | None) -> None:
    """optimizer.step(), running `before_update` on the final (for DP: privatised) gradient.

    A FedProx term added to the loss would be silently dropped under DP: Opacus rebuilds
    p.grad from per-sample gradients of the data loss. Its gradient depends only on the
    weights and the (public) global model, so it is added after clipping and noise.
    """
    if isinstance(optimizer, DPOptimizer):
        if not optimizer.pre_step():  # clip, noise, scale, account; False = skipped step
            return
        if before_update is not None:
            before_update()
        optimizer.original_optimizer.step()
    else:
        if before_update is not None:
            before_update()
        optimizer.step()


def _batches(loader: DataLoader, progress: bool, desc: str) -> Iterator:
    return iter(tqdm(loader, desc=desc, leave=False)) if progress else iter(loader)


def batch_to_device(batch: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """A loader batch -- (images, labels) or (images, labels, augmentation) -- as the model's
    input and targets on `device`: uint8 pixels move as they are and become float there."""
    x = batch[0].to(device, non_blocking=True)
    y = batch[1].to(device, non_blocking=True)
    aug = batch[2] if len(batch) > 2 else None
    if x.dtype == torch.uint8 or aug is not None:
        x = model_input(x, aug)
    return x, y


def train_epoch(
    setup: TrainSetup,
    loader: DataLoader,
    *,
    prox_center: dict[str, Tensor] | None = None,
    prox_mu: float = 0.0,
    progress: bool = False,
) -> EpochStats:
    """One pass over `loader`; adds the FedProx term (mu/2)||w - center||^2 when center given."""
    set_epoch = getattr(loader.dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(setup.epochs_done)
    prox = _prox_grad(setup.model, prox_center, prox_mu) if prox_center and prox_mu else None
    model, device = setup.model, setup.device
    forward = model if setup.compiled is None else setup.compiled  # no truth test: a
    # compiled module forwards len() to the model, which has none
    model.train()
    start = time.perf_counter()
    total, examples, steps = 0.0, 0, 0
    for batch in _batches(loader, progress, f"epoch {setup.epochs_done + 1}"):
        x, y = batch_to_device(batch, device)
        if setup.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        setup.optimizer.zero_grad(set_to_none=True)
        with _autocast(device, setup.amp):
            logits = forward(x)
        loss = setup.loss_fn(logits.float(), y)
        loss.backward()
        _step(setup.optimizer, prox)
        n = len(x)
        if n:  # Poisson sampling (DP) can give empty batches; their loss is NaN
            total += loss.item() * n
            examples += n
        steps += 1
    setup.epochs_done += 1
    seconds = time.perf_counter() - start
    return EpochStats(total / max(examples, 1), examples, steps, seconds)


def predict(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels for every example of `loader` (model in eval mode).

    Runs in fp32 whatever the device (`full_fp32`): these probabilities feed AUROC, the
    bootstrap and the operating thresholds, where bf16 would turn most of them into ties.
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    with torch.no_grad(), full_fp32(device):
        for batch in loader:
            x, _ = batch_to_device(batch, device)
            logits = model(x)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            labels.append(batch[1].numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(labels)


def label_names(n_labels: int) -> list[str]:
    """Finding names for 14 columns, ['Pneumonia'] for 1, label_<i> otherwise."""
    if n_labels == len(FINDINGS):
        return list(FINDINGS)
    if n_labels == 1:
        return ["Pneumonia"]
    return [f"label_{i}" for i in range(n_labels)]


def evaluate_auroc(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
) -> dict:
    """{'per_label': {name: AUROC or None}, 'macro': mean over defined labels or None}.

    A label whose y_true holds a single class has no AUROC; it is reported as None and left
    out of the macro mean.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    labels = np.asarray(labels).reshape(len(labels), -1)
    if probs.shape != labels.shape:
        raise ValueError(
            f"expected probs and labels of the same shape, found {probs.shape} and {labels.shape}"
        )
    names = list(names) if names is not None else label_names(labels.shape[1])
    if len(names) != labels.shape[1]:
        raise ValueError(f"expected {labels.shape[1]} label names, found {len(names)}")
    per_label: dict[str, float | None] = {}
    for j, name in enumerate(names):
        y = labels[:, j]
        defined = len(np.unique(y)) == 2
        per_label[name] = float(roc_auc_score(y, probs[:, j])) if defined else None
    scores = [v for v in per_label.values() if v is not None]
    return {"per_label": per_label, "macro": float(np.mean(scores)) if scores else None}


# --- differential privacy -------------------------------------------------------------------


def make_private(
    setup: TrainSetup, loader: DataLoader, dp_cfg: DPConfig, epochs_total: int
) -> tuple[TrainSetup, DataLoader, PrivacyEngine]:
    """Wrap model, optimizer and loader for DP-SGD; returns (setup, Poisson loader, engine).

    Call once per run and keep the engine: its accountant (dp.accountant) records every step,
    so accounting.epsilon(engine.accountant.history, dp.delta, dp.accountant) is the run's
    epsilon so far (engine.get_epsilon uses Opacus' coarser default PRV error). With
    dp.target_epsilon the noise is calibrated by accounting.noise_multiplier for
    `epochs_total` epochs (all rounds x local epochs), not one.
    """
    if epochs_total < 1:
        raise ValueError(f"expected epochs_total >= 1, found {epochs_total}")
    errors = ModuleValidator.validate(unwrap(setup.model), strict=False)
    if errors:
        raise ValueError(
            f"{type(setup.model).__name__} cannot be trained with Opacus ({len(errors)} "
            f"problem(s), first: {errors[0]}); expected a model from "
            "build_model(..., dp_safe=True) or make_dp_safe(model)"
        )
    model = setup.model.to(memory_format=torch.contiguous_format)
    engine = PrivacyEngine(accountant=accounting.check_kind(dp_cfg.accountant))
    common = {
        "module": model,
        "optimizer": setup.optimizer,
        "data_loader": loader,
        "max_grad_norm": dp_cfg.max_grad_norm,
        "poisson_sampling": True,
        "grad_sample_mode": "hooks",
    }
    noise = dp_cfg.noise_multiplier
    if dp_cfg.target_epsilon is not None:
        # Opacus' Poisson loader: rate 1 / len(loader), int(1 / rate) steps an epoch.
        sample_rate = 1 / len(loader)
        noise = accounting.noise_multiplier(
            dp_cfg.target_epsilon,
            dp_cfg.delta,
            sample_rate,
            epochs_total * int(1 / sample_rate),
            dp_cfg.accountant,
        )
    model, optimizer, private_loader = engine.make_private(noise_multiplier=noise, **common)
    private = replace(setup, model=model, optimizer=optimizer, amp=False, compiled=None)
    return private, private_loader, engine


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """state_dict without Opacus' `_module.` prefix, detached copies (safe to keep as center)."""
    return {
        k.removeprefix(OPACUS_PREFIX): v.detach().clone() for k, v in model.state_dict().items()
    }


def load_plain_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a plain (or `_module.`-prefixed) state_dict into a wrapped or unwrapped model."""
    plain = {k.removeprefix(OPACUS_PREFIX): v for k, v in state.items()}
    unwrap(model).load_state_dict(plain, strict=True)
