"""The paper's augmentation (random resized crop, horizontal flip, +-10 degree rotation) as one
affine sampling grid per batch, applied on the training device to uint8 images.

A loader item carries its image as uint8 (a quarter of float32 to copy) and, when augmented,
its parameters (`AUG_FIELDS`), drawn on the CPU from the (seed, epoch, index) generator so that
batches do not depend on worker count or scheduling. `model_input` turns a batch into what the
model takes: pixels in [0, 1], the crop, flip and rotation sampled bilinearly in one
`grid_sample` (points that the rotation brings in from outside the crop are 0, as Pillow's
`rotate(fillcolor=0)` leaves them), then normalised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NORM_MEAN = 0.5
NORM_STD = 0.25
FLIP_P = 0.5
MAX_ROTATION_DEG = 10.0
CROP_SCALE = (0.85, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# One row of augmentation parameters: the crop box in source pixels, flip (0/1), degrees.
AUG_FIELDS = ("top", "left", "height", "width", "flip", "angle")


def crop_box(
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, height, width) inside a size x size image."""
    area = size * size * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = min(size, max(1, round(math.sqrt(area * aspect))))
    height = min(size, max(1, round(math.sqrt(area / aspect))))
    top = int(rng.integers(0, size - height + 1))
    left = int(rng.integers(0, size - width + 1))
    return top, left, height, width


def draw_params(rng: np.random.Generator, size: int) -> np.ndarray:
    """One item's augmentation (AUG_FIELDS) for a size x size source image, as float32."""
    top, left, height, width = crop_box(rng, size)
    flip = float(rng.random() < FLIP_P)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    return np.array([top, left, height, width, flip, angle], dtype=np.float32)


def _base(size: int, like: Tensor) -> Tensor:
    """Pixel-centre coordinates of a size-pixel axis in grid_sample's normalised units."""
    return (torch.arange(size, device=like.device, dtype=torch.float32) * 2 + 1) / size - 1


def sampling_grid(params: Tensor, source: int, size: int) -> tuple[Tensor, Tensor]:
    """(B x size x size x 2 source coordinates, B x 1 x size x size mask) for grid_sample
    (normalised, corners not aligned): each output point is un-rotated about the centre, then
    un-flipped, then mapped into the crop box. The mask is 0 where the un-rotated point falls
    outside the crop: Pillow's rotate fills those pixels with 0."""
    top, left, height, width, flip, angle = params.to(torch.float32).unbind(-1)
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad)[:, None, None], torch.sin(rad)[:, None, None]
    xs = _base(size, params)[None, None, :]
    ys = _base(size, params)[None, :, None]
    # Pillow rotates counter-clockwise as displayed (y down): output q came from R^-1 q.
    rx, ry = cos * xs - sin * ys, sin * xs + cos * ys
    mask = ((rx.abs() <= 1) & (ry.abs() <= 1)).unsqueeze(1).to(torch.float32)
    sign = (1.0 - 2.0 * flip)[:, None, None]  # -1 where flipped
    gx = (width / source)[:, None, None] * sign * rx + ((2 * left + width) / source - 1)[
        :, None, None
    ]
    gy = (height / source)[:, None, None] * ry + ((2 * top + height) / source - 1)[:, None, None]
    return torch.stack([gx, gy], dim=-1), mask


def augment(images: Tensor, params: Tensor, size: int) -> Tensor:
    """Crop-resize, flip and rotate a batch (B x 1 x S x S, float) to B x 1 x size x size in
    one bilinear sampling; the fill outside the rotated image is 0."""
    if len(images) == 0:
        return images.new_zeros((0, 1, size, size))
    grid, mask = sampling_grid(params.to(images.device), images.shape[-1], size)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * mask


def model_input(images: Tensor, params: Tensor | None) -> Tensor:
    """A batch as the model takes it: uint8 (0..255) or float (0..1) pixels, B x [1 x] S x S,
    augmented when `params` is given (output S x S), normalised with NORM_MEAN / NORM_STD."""
    scale = 1.0 / NORM_STD / (255.0 if images.dtype == torch.uint8 else 1.0)
    x = images.to(torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if params is not None:
        x = augment(x, params, x.shape[-1])  # linear in the pixels: scale afterwards
    return x * scale - NORM_MEAN / NORM_STD
