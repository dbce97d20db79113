"""What a synthetic radiograph shows (`RenderSpec`) and the seeded random streams behind it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RenderSpec", "seed64", "spec_rng"]

_U64 = 1 << 64


@dataclass(frozen=True)
class RenderSpec:
    """What to draw: one NIH metadata row plus the seeds that make it reproducible."""

    patient_seed: int
    image_seed: int
    labels: tuple[str, ...]
    boxes: tuple[tuple[str, float, float, float, float], ...] = ()
    view: str = "PA"
    age: float = 50.0
    sex: str = "M"
    scanner: int = 0
    miss_prob: float = 0.1


def seed64(value: int) -> int:
    """`value` reduced to an unsigned 64-bit seed word."""
    return int(value) % _U64


def spec_rng(spec: RenderSpec, stream: int, with_image: bool = True) -> np.random.Generator:
    """The random stream `stream` of this patient (and, with_image, of this image)."""
    parts = [seed64(spec.patient_seed)]
    if with_image:
        parts.append(seed64(spec.image_seed))
    parts.append(stream)
    return np.random.default_rng(parts)
