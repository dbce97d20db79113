"""Validation AUROC of a model on the pooled validation splits: the points of a learning curve."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fedcxr.convergence import CurvePoint
from fedcxr.sitedata import SiteData
from fedcxr.stageio import write_json
from fedcxr.train.data import XrayDataset, make_loader
from fedcxr.train.ddpspec import DDPSpec
from fedcxr.train.loop import evaluate_auroc, load_plain_state_dict, predict


class Validator:
    """Macro AUROC of a model on the pooled validation splits of the given site folders.

    Every configuration of the study is validated on the same rows (the union of the sites'
    validation splits), so their curves share one axis and one yardstick.
    """

    def __init__(
        self,
        folders: Sequence[Path],
        task: str,
        image_size: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        sites = [SiteData.open(folder) for folder in folders]
        self.dataset = XrayDataset.from_split(sites, "val", task, image_size)
        self.loader = make_loader(self.dataset, batch_size, shuffle=False)
        self.device = device

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, model: nn.Module) -> float | None:
        if len(self.dataset) == 0:
            return None
        probs, labels = predict(model, self.loader, self.device)
        return evaluate_auroc(probs, labels)["macro"]


def spec_validator(spec: DDPSpec, device: torch.device) -> Validator | None:
    """The validator of spec.val_data (None when the spec asks for no learning curve)."""
    if not spec.val_data:
        return None
    return Validator(list(spec.val_data), spec.task, spec.image_size, spec.batch_size, device)


class RoundCurve:
    """The federated learning curve: each round's global model validated as the round closes.

    Simulation instrumentation (the stage that runs every site also holds their validation
    splits; a deployed aggregator has no data). Points are kept in `path` (JSON, round ->
    AUROC) as they come, so a resumed federation keeps the rounds before its restart.
    """

    def __init__(self, validator: Validator, model: nn.Module, path: Path) -> None:
        self.validator, self.model, self.path = validator, model, path
        self.by_round: dict[int, float | None] = {}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                self.by_round = {int(k): v for k, v in saved.items()}
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: expected {{round: AUROC}} JSON, found: {exc}") from None

    def __call__(self, rnd: int, state: Mapping[str, torch.Tensor]) -> None:
        load_plain_state_dict(self.model, dict(state))
        self.by_round[rnd] = self.validator(self.model)
        write_json(self.path, {str(k): v for k, v in sorted(self.by_round.items())})

    def points(self, local_epochs: int) -> tuple[CurvePoint, ...]:
        """The curve by cumulative local epochs (round r of E local epochs: r * E)."""
        return tuple(CurvePoint(r * local_epochs, v) for r, v in sorted(self.by_round.items()))
