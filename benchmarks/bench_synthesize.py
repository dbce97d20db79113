"""Benchmark: ms per image of the synthesize stage's render and PNG encode, now vs a baseline.

Usage: python benchmarks/bench_synthesize.py [--n 24] [--repeat 3] [--baseline REV]

Renders the first --n images of the default data set (real NIH rows, default seed) in one
process and encodes them, timing render and encode separately (best of --repeat runs, CPU time
of this process, so other load on the machine counts less). The encode is timed for this
code's encoder (`synth.png`) and for PIL's PNG writer at compress_level=1 (what the stage
used before), on the same pixels. With --baseline REV the renderer of git revision REV
(`git show`, read-only) is timed too, on the same specs. Last line: JSON.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from PIL import Image

from fedcxr.config import SyntheticConfig
from fedcxr.metadata import embedded_metadata_path, read_bboxes
from fedcxr.synth.png import encode_gray_png
from fedcxr.synth.render import RenderSpec, render
from fedcxr.synthesize import IMAGE_SIZE, build_specs, first_visits, sample_by_patient

_SYNTH = "src/fedcxr/synth"


def _specs(n: int, seed: int) -> list[RenderSpec]:
    """The first n images of the default data set, chosen as the synthesize stage chooses."""
    cfg = SyntheticConfig()
    raw = pd.read_csv(embedded_metadata_path(), dtype=str, keep_default_na=False)
    rows = sample_by_patient(first_visits(raw, cfg.max_per_patient), cfg.n_images, seed, cfg.enrich)
    return build_specs(rows, read_bboxes(), cfg, seed)[:n]


def _baseline_render(rev: str, scratch: Path) -> Callable[[RenderSpec, int], np.ndarray]:
    """`render` of git revision `rev`, imported from a copy of its synth package."""
    root = Path(__file__).resolve().parents[1]
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:{_SYNTH}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    package = f"baseline_synth_{re.sub(r'[^0-9A-Za-z]', '_', rev)}"
    (scratch / package).mkdir()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(
                ["git", "show", f"{rev}:{_SYNTH}/{name}"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (scratch / package / name).write_text(re.sub(r"\bfedcxr\.synth\b", package, text))
    sys.path.insert(0, str(scratch))
    return importlib.import_module(f"{package}.render").render


def _pil_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _best_ms(fn: Callable[[object], object], items: list, repeat: int) -> tuple[float, list]:
    """Best of `repeat` runs of fn over items, in CPU ms per item, and the last run's results."""
    best, results = float("inf"), []
    for _ in range(repeat):
        start = time.process_time()
        results = [fn(item) for item in items]
        best = min(best, time.process_time() - start)
    return 1e3 * best / len(items), results


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command()
def main(
    n: Annotated[int, typer.Option("--n", help="Images to render and encode per run.")] = 24,
    repeat: Annotated[int, typer.Option(help="Runs per variant; the best counts.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the data set (params.yaml's seed).")] = 0,
    baseline: Annotated[
        str, typer.Option(help="Git revision whose renderer to time as well ('' = none).")
    ] = "",
) -> None:
    """Render and encode ms/image of the synthesize stage (one process, CPU time)."""
    specs = _specs(n, seed)
    render(specs[0], IMAGE_SIZE)  # warm the caches (noise tiles, vessel tables, NIH boxes)
    result: dict[str, float | int | str] = {"images": len(specs), "repeat": repeat}
    result["render_ms"], pixels = _best_ms(lambda s: render(s, IMAGE_SIZE), specs, repeat)
    result["encode_ms"], files = _best_ms(encode_gray_png, pixels, repeat)
    result["encode_pil_ms"], pil_files = _best_ms(_pil_png, pixels, repeat)
    result["png_kb"] = float(np.mean([len(f) for f in files]) / 1e3)
    result["png_pil_kb"] = float(np.mean([len(f) for f in pil_files]) / 1e3)
    for data, pix in zip(files, pixels, strict=True):  # the files decode to the pixels
        if not np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pix):
            raise SystemExit("synth.png wrote a file that does not decode to its pixels")
    result["total_ms"] = result["render_ms"] + result["encode_ms"]
    print(f"render   {result['render_ms']:7.1f} ms/image")
    print(f"encode   {result['encode_ms']:7.1f} ms/image  {result['png_kb']:6.0f} kB  (synth.png)")
    print(
        f"encode   {result['encode_pil_ms']:7.1f} ms/image  {result['png_pil_kb']:6.0f} kB"
        "  (PIL, compress_level=1)"
    )
    if baseline:
        with tempfile.TemporaryDirectory() as scratch:
            old = _baseline_render(baseline, Path(scratch))
            old(specs[0], IMAGE_SIZE)
            result["baseline"] = baseline
            result["baseline_render_ms"], _ = _best_ms(lambda s: old(s, IMAGE_SIZE), specs, repeat)
        result["baseline_total_ms"] = result["baseline_render_ms"] + result["encode_pil_ms"]
        result["speedup"] = result["baseline_total_ms"] / result["total_ms"]
        print(
            f"baseline {baseline}: render {result['baseline_render_ms']:.1f} + PIL encode "
            f"{result['encode_pil_ms']:.1f} ms/image; now {result['total_ms']:.1f}: "
            f"{result['speedup']:.2f}x"
        )
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    app()
