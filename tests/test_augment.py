"""The batched tensor augmentation is the paper's: Pillow's crop-resize, flip and rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedcxr.train.augment import AUG_FIELDS, augment, draw_params, model_input

SIZE = 96


def _image() -> np.ndarray:
    """A smooth, asymmetric test image (interpolation errors stay small; flips show)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = 127 + 60 * np.sin(xx / 9.0) + 50 * np.cos(yy / 13.0) + (xx > 60) * 10 + yy / 8
    return img.clip(0, 255).astype(np.uint8)


def pil_reference(image: np.ndarray, params: tuple[float, ...]) -> np.ndarray:
    """The augmentation as the data path did it with Pillow, one image at a time."""
    top, left, height, width, flip, angle = params
    pil = Image.fromarray(image).resize(
        (SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)
    )
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(pil, dtype=np.float32)


CASES = [
    (0, 0, SIZE, SIZE, 0, 0.0),  # identity
    (4, 7, 82, 89, 0, 0.0),  # crop-resize only
    (4, 7, 82, 89, 1, 0.0),  # and flip
    (0, 0, SIZE, SIZE, 0, 10.0),  # rotation, counter-clockwise as displayed
    (0, 0, SIZE, SIZE, 1, -7.5),
    (6, 2, 84, 78, 1, 8.5),  # everything
]


@pytest.mark.parametrize("params", CASES)
def test_one_sampling_grid_matches_pillow_within_interpolation_tolerance(params) -> None:
    image = _image()
    x = torch.from_numpy(image)[None, None].float() / 255
    out = augment(x, torch.tensor([params], dtype=torch.float32), SIZE)[0, 0].numpy() * 255
    diff = np.abs(out - pil_reference(image, params))
    # Bilinear both; the only large differences are single pixels on the fill boundary.
    assert diff.mean() < 1.0, diff.mean()
    assert np.percentile(diff, 99) < 2.0


def test_a_batch_is_augmented_item_by_item() -> None:
    image = torch.from_numpy(_image())[None]
    params = torch.tensor(CASES[1:4], dtype=torch.float32)
    batch = model_input(image.expand(3, 1, SIZE, SIZE), params)
    for k, p in enumerate(CASES[1:4]):
        one = model_input(image[None], torch.tensor([p], dtype=torch.float32))
        torch.testing.assert_close(batch[k], one[0])
    assert model_input(image[:0].reshape(0, 1, SIZE, SIZE), params[:0]).shape == (0, 1, SIZE, SIZE)


def test_parameters_are_the_papers_ranges() -> None:
    rng = np.random.default_rng(0)
    drawn = np.stack([draw_params(rng, SIZE) for _ in range(2000)])
    assert drawn.shape == (2000, len(AUG_FIELDS))
    top, left, height, width, flip, angle = drawn.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= SIZE).all() and (left + width <= SIZE).all()
    area = height * width / SIZE**2
    assert area.min() > 0.8 and area.max() <= 1.0
    assert set(np.unique(flip)) == {0.0, 1.0} and 0.45 < flip.mean() < 0.55
    assert -10 <= angle.min() < -9 and 9 < angle.max() <= 10
