"""Short measurements of this machine for the cost planner: PNG decoding and training rates."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from fedcxr.config import TrainConfig
from fedcxr.labels import FINDINGS
from fedcxr.models import build_model
from fedcxr.parallel import available_cores
from fedcxr.train.data import make_loader, resize_image
from fedcxr.train.loop import make_setup, seed_everything, train_epoch

NIH_SIZE = 1024


def _radiograph_like(rng: np.random.Generator) -> bytes:
    """A 1024 x 1024 8-bit PNG with the smooth-plus-noise texture of a chest X-ray."""
    yy, xx = np.mgrid[0:NIH_SIZE, 0:NIH_SIZE] / NIH_SIZE
    body = 140 + 60 * np.sin(3 * xx) * np.cos(2 * yy) - 50 * (xx - 0.5) ** 2
    pixels = (body + rng.normal(0, 6, body.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rate(stored_size: int, n: int = 8, cores: int | None = None) -> float:
    """Images/s that decoding a 1024 px PNG and resizing it to stored_size reaches on this
    machine with every core busy (one core measured, times the cores)."""
    rng = np.random.default_rng(0)
    pngs = [_radiograph_like(rng) for _ in range(2)]
    start = time.perf_counter()
    for i in range(n):
        with Image.open(io.BytesIO(pngs[i % 2])) as image:
            resize_image(np.asarray(image.convert("L")), stored_size)
    per_core = n / (time.perf_counter() - start)
    return per_core * (cores or available_cores())


def train_rate(
    arch: str, image_size: int, batch_size: int, device: torch.device, batches: int = 3
) -> float:
    """Training images/s of `arch` at image_size on `device` (fed tensors; after a warm-up)."""
    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    n = batches * batch_size
    x = torch.randn(n, 1, image_size, image_size, generator=gen)
    y = (torch.rand(n, len(FINDINGS), generator=gen) < 0.1).float()
    loader = make_loader(torch.utils.data.TensorDataset(x, y), batch_size, shuffle=False)
    cfg = TrainConfig(lr=1e-4, batch_size=batch_size, image_size=image_size)
    labels = np.zeros((2, len(FINDINGS)), np.float32)
    setup = make_setup(build_model(arch, len(FINDINGS)), cfg, "multilabel", labels, device)
    train_epoch(setup, loader)  # warm-up: allocator, kernels
    stats = train_epoch(setup, loader)
    return stats.examples / stats.seconds
