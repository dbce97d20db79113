"""Grad-CAM panels: where a classifier looks on chest X-rays, as heat maps over the images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from fedcxr.train.augment import NORM_MEAN, NORM_STD
from fedcxr.train.data import to_input

# Layer whose activations Grad-CAM weighs, per registered architecture (fedcxr.models.MODELS),
# as a dotted path of attribute names and indices. make_dp_safe keeps module names, so the DP
# variants use the same paths; an Opacus wrapper's `_module` is unwrapped first.
TARGET_LAYERS: dict[str, str] = {
    "smallcnn": "features.-1.-2",  # last ReLU of the last conv block, before its max-pool
    "resnet50": "layer4.-1",  # last bottleneck block
    "densenet121": "features.-1",  # norm5 (BatchNorm; GroupNorm in the DP-safe variant)
}
PANEL_COLUMNS = 4


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module  # type: ignore[assignment]
    return model


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The module Grad-CAM hooks for `arch` (see TARGET_LAYERS)."""
    if arch not in TARGET_LAYERS:
        raise ValueError(
            f"no Grad-CAM target layer for model.arch {arch!r}; expected one of "
            f"{sorted(TARGET_LAYERS)} (add it to fedcxr.report.gradcam.TARGET_LAYERS)"
        )
    module: nn.Module = _unwrap(model)
    for part in TARGET_LAYERS[arch].split("."):
        try:
            index = part.lstrip("-").isdigit()
            module = module[int(part)] if index else getattr(module, part)  # type: ignore[index]
        except (AttributeError, IndexError, TypeError):
            raise ValueError(
                f"model {type(model).__name__} has no layer {TARGET_LAYERS[arch]!r} (stuck at "
                f"{part!r}); expected the layout of fedcxr.models {arch!r}"
            ) from None
    return module


def grid_shape(n: int, columns: int = PANEL_COLUMNS) -> tuple[int, int]:
    """(rows, columns) of a panel grid for n images."""
    if n < 1:
        raise ValueError(f"expected at least one image for a Grad-CAM panel, found {n}")
    cols = min(n, columns)
    return math.ceil(n / cols), cols


def model_inputs(
    images: np.ndarray | torch.Tensor, image_size: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """(model inputs N x 1 x s x s, display images N x s x s in [0, 1]).

    numpy images (N x H x W, uint8 as stored, or float in [0, 1]) go through the training
    pipeline's `to_input` (no augmentation); tensors are taken as model inputs already.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(
                f"expected model-input tensors N x 1 x H x W, found shape {tuple(images.shape)}"
            )
    else:
        arr = np.asarray(images)
        if arr.ndim != 3:
            raise ValueError(f"expected images N x H x W, found shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
                raise ValueError(
                    f"expected float images in [0, 1] (or uint8), found values in "
                    f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]"
                )
            arr = np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
        size = image_size or arr.shape[-1]
        x = torch.stack([to_input(img, size) for img in arr])
    display = (x[:, 0] * NORM_STD + NORM_MEAN).clamp(0.0, 1.0).numpy()
    return x, display


def gradcam_maps(
    model: nn.Module, arch: str, inputs: torch.Tensor, target_class: int
) -> np.ndarray:
    """Grad-CAM heat maps (N x H x W, each scaled to [0, 1]) for logit `target_class`."""
    layer = target_layer(model, arch)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = model(inputs[:1]).shape[-1]
    if not 0 <= target_class < width:
        raise ValueError(
            f"expected target_class in 0..{width - 1} for a model with {width} outputs, "
            f"found {target_class}"
        )
    targets = [ClassifierOutputTarget(target_class) for _ in range(len(inputs))]
    try:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=inputs, targets=targets)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def panel_figure(
    display: np.ndarray, cams: np.ndarray, titles: Sequence[str], alpha: float = 0.45
) -> Figure:
    """A grid of X-rays with their heat maps overlaid, one titled panel per image."""
    if not len(display) == len(cams) == len(titles):
        raise ValueError(
            f"expected as many heat maps and titles as images, found {len(display)} images, "
            f"{len(cams)} maps, {len(titles)} titles"
        )
    rows, cols = grid_shape(len(display))
    fig = Figure(figsize=(2.8 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(display):
            fig.delaxes(ax)
            continue
        ax.imshow(display[i], cmap="gray", vmin=0.0, vmax=1.0)
        ax.imshow(cams[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(titles[i], fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def gradcam_panel(
    model: nn.Module,
    arch: str,
    images: np.ndarray | torch.Tensor,
    target_class: int,
    out_png: Path,
    titles: Sequence[str] | None = None,
    image_size: int | None = None,
) -> np.ndarray:
    """Grad-CAM for `target_class` on each image, saved as a PNG grid; returns the heat maps.

    `images`: N x H x W numpy images (uint8 as stored, or float in [0, 1]; resized to
    `image_size`, default their own size, the way training does) or model-input tensors.
    """
    inputs, display = model_inputs(images, image_size)
    titles = list(titles) if titles is not None else [f"image {i + 1}" for i in range(len(inputs))]
    if len(titles) != len(inputs):
        raise ValueError(f"expected {len(inputs)} titles (one per image), found {len(titles)}")
    cams = gradcam_maps(model, arch, inputs, target_class)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    panel_figure(display, cams, titles).savefig(
        out_png, format="png", dpi=110, metadata={"Software": None}
    )
    return cams
