"""Training layer: data loading, the one training loop, evaluation and DP wrapping."""

from fedcxr.train.data import XrayDataset, labels_for, make_loader, pos_weight
from fedcxr.train.loop import (
    EpochStats,
    TrainSetup,
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

__all__ = [
    "EpochStats",
    "TrainSetup",
    "XrayDataset",
    "evaluate_auroc",
    "labels_for",
    "load_plain_state_dict",
    "make_loader",
    "make_private",
    "make_setup",
    "pick_device",
    "plain_state_dict",
    "pos_weight",
    "predict",
    "seed_everything",
    "threads_per_process",
    "train_epoch",
]
