"""Command line of one centralized-DDP process; start W of them with torchrun (or launch_ddp)."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer

from fedcxr.tensorfile import MODEL
from fedcxr.train.ddp import CONFIG, METRICS, TIMINGS, WORKER_MODULE, train_ddp
from fedcxr.train.ddpspec import SPEC_FILE, DDPSpec, read_spec

PROG = f"torchrun --standalone --nproc_per_node=W -m {WORKER_MODULE}"
SPEC_KEYS = ", ".join(
    f.name if f.default is MISSING else f"{f.name} ({f.default!r})" for f in fields(DDPSpec)
)
DESCRIPTION = f"""\
Centralized (pooled) training of one model with torch DistributedDataParallel: the train
splits of every site folder in the spec's `data` are pooled (in the order given) and trained
by W processes, each on a batch_size / W slice of every global batch, so the steps equal
single-process training with the spec's batch_size. Backend: gloo on CPU, nccl with CUDA.

\b
  torchrun --standalone --nproc_per_node=2 -m {WORKER_MODULE} --spec {SPEC_FILE}

The spec is one JSON object (fedcxr.train.ddpspec.write_spec writes it; launch_ddp does so in a
temporary folder) with the keys: {SPEC_KEYS}. `data` is a list of site folders; unknown or
missing keys are refused.

Rank 0 writes {MODEL} (safetensors checkpoint), {METRICS} (per-epoch loss, steps,
all-reduce bytes summed over ranks), {TIMINGS} and {CONFIG} into the spec's `out`.
"""

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help=DESCRIPTION)
def main(
    spec_file: Annotated[
        Path,
        typer.Option(
            "--spec",
            metavar="FILE",
            help="The run's DDPSpec as JSON (see above): site folders, output folder, training "
            "settings.",
        ),
    ],
) -> None:
    """Read the spec, train; a bad spec or configuration is one line on stderr, exit status 1."""
    try:
        train_ddp(read_spec(spec_file))
    except (ValueError, FileNotFoundError) as exc:
        print(f"[ddp_worker] failed: {exc}", file=sys.stderr, flush=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app(prog_name=PROG)
