"""Command line of one centralized-DDP process; start W of them with torchrun (or launch_ddp)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcxr.models import MODELS
from fedcxr.train.data import TASKS
from fedcxr.train.ddp import CONFIG, METRICS, MODEL, TIMINGS, WORKER_MODULE, DDPSpec, train_ddp

DESCRIPTION = f"""\
Centralized (pooled) training of one model with torch DistributedDataParallel: the train
splits of every --data site folder are pooled (in the order given) and trained by W
processes, each on a batch_size / W slice of every global batch, so the steps equal
single-process training with --batch-size. Backend: gloo on CPU, nccl with CUDA.

  torchrun --standalone --nproc_per_node=2 -m fedcxr.train.ddp_worker \\
      --data data/sites/site_1 --data data/sites/site_2 --out out/ddp --dp-safe

Rank 0 writes {MODEL} (safetensors checkpoint), {METRICS} (per-epoch loss, steps,
all-reduce bytes summed over ranks), {TIMINGS} and {CONFIG} into --out.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"torchrun --standalone --nproc_per_node=W -m {WORKER_MODULE}",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--data",
        action="append",
        required=True,
        type=Path,
        metavar="DIR",
        help="a site folder (images.npy + index.csv); repeat for each site to pool",
    )
    add("--out", required=True, type=Path, metavar="DIR", help="output folder (rank 0 writes)")
    add("--task", choices=TASKS, default="multilabel", help="default: %(default)s")
    add("--arch", choices=sorted(MODELS), default="smallcnn", help="default: %(default)s")
    add("--epochs", type=int, default=2, help="default: %(default)s")
    add(
        "--batch-size",
        type=int,
        default=32,
        help="GLOBAL batch size, divisible by the number of processes (default: %(default)s)",
    )
    add("--lr", type=float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    add(
        "--image-size",
        type=int,
        default=128,
        help="training resolution, <= the stored size (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=42,
        help="seeds init, shuffling (seed + epoch) and augmentation (default: %(default)s)",
    )
    add(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flip/rotate/crop augmentation, drawn per (seed, epoch, example) (default: on)",
    )
    add("--num-workers", type=int, default=0, help="DataLoader workers per process")
    add(
        "--dp-safe",
        action="store_true",
        help="GroupNorm instead of BatchNorm: results then do not depend on the process count",
    )
    add("--pretrained", action="store_true", help="ImageNet weights (resnet50, densenet121)")
    return parser


def spec_from_args(argv: Sequence[str] | None = None) -> DDPSpec:
    """Parse the worker's arguments into a DDPSpec."""
    args = build_parser().parse_args(argv)
    return DDPSpec(
        data=tuple(args.data),
        out=args.out,
        task=args.task,
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
        augment=args.augment,
        num_workers=args.num_workers,
        dp_safe=args.dp_safe,
        pretrained=args.pretrained,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train; configuration errors become one line on stderr and exit status 1."""
    spec = spec_from_args(argv)
    try:
        train_ddp(spec)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[ddp_worker] failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
