"""Training throughput: a bare PyTorch loop, fedcxr's loop fed tensors, fedcxr's real data path.

Prints images/s for
  (a) bare: a plain Adam + BCE loop on batches already on the device,
  (b) tensor-fed: fedcxr's `train_epoch` fed the same pre-made tensors,
  (c) real: fedcxr's `train_epoch` through its real data path (a memory-mapped site folder of
      stored-size uint8 images, the paper's augmentation, `make_loader`),
and as its last line one JSON object with the figures and `real_vs_bare`,
`tensor_fed_vs_bare` and `real_vs_tensor_fed`.

With no arguments it measures the default model and training size (params.yaml) on this
machine's CPU, in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import typer
from torch import nn

from fedcxr.config import Params, TrainConfig, load_params
from fedcxr.labels import FINDINGS
from fedcxr.models import build_model
from fedcxr.sitedata import IMAGES, INDEX, SiteData
from fedcxr.train.data import XrayDataset, make_loader
from fedcxr.train.loop import make_setup, seed_everything, train_epoch

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def site_folder(
    root: Path, n: int, stored: int, seed: int = 0, val_every: int = 0, tag: str = ""
) -> SiteData:
    """A site folder of `n` random stored x stored uint8 images: all in the train split, or
    one in `val_every` in the val split; `tag` keeps ids apart between sites."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(
        root / IMAGES, mode="w+", dtype=np.uint8, shape=(n, stored, stored)
    )
    for start in range(0, n, 128):
        stop = min(n, start + 128)
        images[start:stop] = rng.integers(0, 256, (stop - start, stored, stored), dtype=np.uint8)
    images.flush()
    del images
    index = pd.DataFrame(
        {
            "image_id": [f"img{tag}{i:06d}" for i in range(n)],
            "patient_id": [f"p{tag}{i:06d}" for i in range(n)],
            "split": ["val" if val_every and i % val_every == 0 else "train" for i in range(n)],
        }
    )
    for finding in FINDINGS:
        index[finding] = (rng.random(n) < 0.1).astype(int)
    index["age"], index["sex"], index["view"] = 50, "M", "PA"
    index.to_csv(root / INDEX, index=False)
    return SiteData.open(root)


def bare_loop(
    arch: str, x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int, compile_: bool = False
) -> float:
    """Median images/s per epoch of a plain loop over (x, y) on the device (after a warm-up)."""
    device = x.device
    torch.manual_seed(0)
    model = build_model(arch, y.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_ else model
    loss_fn = nn.BCEWithLogitsLoss()
    rates = []
    for epoch in range(epochs + 1):
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward(x[i : i + batch]), y[i : i + batch])
            loss.backward()
            opt.step()
        _sync(device)
        if epoch:  # the first epoch warms up (allocator, kernels)
            rates.append(len(x) / (time.perf_counter() - start))
    return statistics.median(rates)


def fedcxr_loop(
    arch: str, loader: torch.utils.data.DataLoader, cfg: TrainConfig, device: torch.device,
    epochs: int,
) -> float:  # fmt: skip
    """Median images/s per epoch of fedcxr's train_epoch over `loader` (after a warm-up)."""
    seed_everything(0)
    model = build_model(arch, len(FINDINGS))
    setup = make_setup(model, cfg, "multilabel", np.zeros((10, len(FINDINGS)), np.float32), device)
    rates = []
    for epoch in range(epochs + 1):
        stats = train_epoch(setup, loader)
        _sync(device)
        if epoch:
            rates.append(stats.examples / stats.seconds)
    return statistics.median(rates)


Opt = typer.Option


@app.command()
def main(
    arch: Annotated[str | None, Opt(help="Model (default: model.arch).")] = None,
    size: Annotated[int | None, Opt(help="Training size (default: train.image_size).")] = None,
    stored: Annotated[int | None, Opt(help="Stored size (default: resize.size).")] = None,
    batch: Annotated[int | None, Opt(help="Batch size (default: train.batch_size).")] = None,
    images: Annotated[int, Opt(help="Images per epoch.")] = 512,
    epochs: Annotated[int, Opt(help="Measured epochs (after one warm-up); the median counts.")] = 3,
    workers: Annotated[
        str | None, Opt(help="Loader workers of (c): a count or auto (default: params).")
    ] = None,
    device: Annotated[str, Opt(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, Opt(help="torch threads (default: torch's).")] = None,
    compile_: Annotated[
        bool, Opt("--compile", help="torch.compile every loop (train.compile for fedcxr's).")
    ] = False,
    params: Annotated[Path, Opt(help="params.yaml for the defaults.")] = Path("params.yaml"),
) -> None:
    """Measure the three loops and print their images/s; the last line is JSON."""
    p = load_params(params) if params.is_file() else Params()
    arch = arch or p.model.arch
    size = size or p.train.image_size
    stored = stored or p.resize.size
    batch = batch or p.train.batch_size
    overrides: dict = {
        "batch_size": batch,
        "image_size": size,
        "augment": True,
        "compile": compile_,
    }
    if workers is not None:
        overrides["num_workers"] = int(workers) if workers.isdigit() else workers
    cfg = p.train.model_copy(update=overrides)
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    print(
        f"bench_train: {arch} at {size}px from {stored}px, batch {batch}, {images} images x "
        f"{epochs} epochs, {dev}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, 1, size, size, generator=gen)
    y = (torch.rand(images, len(FINDINGS), generator=gen) < 0.1).float()
    bare = bare_loop(arch, x.to(dev), y.to(dev), batch, epochs, compile_)
    print(f"  (a) bare loop on device tensors   {bare:8.1f} images/s")
    tensors = torch.utils.data.TensorDataset(x, y)
    loader = make_loader(tensors, batch, shuffle=True, seed=0, num_workers=0)
    tensor_fed = fedcxr_loop(arch, loader, cfg, dev, epochs)
    print(f"  (b) fedcxr loop, tensor-fed       {tensor_fed:8.1f} images/s")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        site = site_folder(Path(tmp) / "site", images, stored)
        start = time.perf_counter()
        data = XrayDataset.from_split([site], "train", "multilabel", size, augment=True, seed=0)
        copy_s = time.perf_counter() - start
        loader = make_loader(data, batch, shuffle=True, seed=0, num_workers=cfg.num_workers)
        real = fedcxr_loop(arch, loader, cfg, dev, epochs)
    print(
        f"  (c) fedcxr, real data path        {real:8.1f} images/s  (num_workers={cfg.num_workers})"
    )
    print(f"      training copy {stored} -> {size} px, made once: {images / copy_s:.0f} images/s")
    print(
        json.dumps(
            {
                "arch": arch,
                "size": size,
                "stored": stored,
                "batch": batch,
                "device": str(dev),
                "compile": compile_,
                "num_workers": cfg.num_workers,
                "bare": round(bare, 1),
                "tensor_fed": round(tensor_fed, 1),
                "real": round(real, 1),
                "real_vs_bare": round(real / bare, 3),
                "tensor_fed_vs_bare": round(tensor_fed / bare, 3),
                "real_vs_tensor_fed": round(real / tensor_fed, 3),
                "training_copy_images_per_s": round(images / copy_s, 1),
            }
        )
    )


if __name__ == "__main__":
    app()
