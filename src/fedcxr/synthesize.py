"""The embedded default data set: real NIH metadata rows with synthetic radiographs."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.config import SyntheticConfig
from fedcxr.labels import FINDINGS
from fedcxr.metadata import embedded_metadata_path, read_bboxes
from fedcxr.parallel import pmap
from fedcxr.partition import fill_exact
from fedcxr.synth.png import encode_gray_png
from fedcxr.synth.render import N_SCANNERS, RenderSpec, drawn_findings, render

METADATA_NAME = "Data_Entry_2017.csv"
IMAGE_SIZE = 1024


def stable_int(*parts: object) -> int:
    """A 63-bit integer from the parts, identical in every process (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def first_visits(raw: pd.DataFrame, k: int | None) -> pd.DataFrame:
    """Each patient's first k images by follow-up number (all of them when k is None).

    NIH averages 3.6 images per patient and some patients have over 100; a test set's
    confidence interval (patients are resampled whole) shrinks with the number of patients, so
    the small embedded default keeps fewer follow-ups per patient and thus more patients.
    """
    if k is None:
        return raw
    if k < 1:
        raise ValueError(f"expected max_per_patient >= 1 or null, found {k}")
    order = raw.assign(_visit=pd.to_numeric(raw["Follow-up #"], errors="raise"))
    order = order.sort_values(["Patient ID", "_visit", "Image Index"], kind="stable")
    kept = order.groupby("Patient ID", sort=False).head(k).drop(columns="_visit")
    return kept.sort_values("Image Index", kind="stable")


def sample_by_patient(
    raw: pd.DataFrame, n_images: int, seed: int, enrich: dict[str, float] | None = None
) -> pd.DataFrame:
    """Exactly n_images rows, keeping every image of each sampled patient.

    `enrich` makes patients with a given finding (in any of their images) that many times
    likelier to be drawn; without it every patient is equally likely.
    """
    if n_images >= len(raw):
        return raw.copy()
    rng = np.random.default_rng([seed, 11])
    grouped = raw.groupby("Patient ID", sort=False)
    counts = grouped.size()
    scores = rng.gumbel(size=(len(counts), 2))
    if enrich:
        findings = grouped["Finding Labels"].agg("|".join)
        weight = np.ones(len(counts))
        for finding, factor in sorted(enrich.items()):
            has = findings.str.split("|").map(lambda labels, f=finding: f in labels).to_numpy()
            weight = np.where(has, np.maximum(weight, factor), weight)
        scores[:, 0] += np.log(weight)
    chosen = fill_exact(counts.to_numpy(), scores, [n_images, len(raw) - n_images], rng)
    keep = set(counts.index[chosen == 0])
    return raw[raw["Patient ID"].isin(keep)].sort_values("Image Index", kind="stable")


def scanner_for(patient_id: str, view: str, seed: int) -> int:
    """Portable (AP) and fixed (PA) machines differ; a patient tends to stay on one of each."""
    half = N_SCANNERS // 2
    pick = stable_int(seed, "scanner", patient_id, view) % half
    return pick + (half if view == "AP" else 0)


def build_specs(rows: pd.DataFrame, bboxes: pd.DataFrame, cfg: SyntheticConfig, seed: int):
    """One RenderSpec per metadata row (columns in NIH's own names)."""
    boxes_by_image: dict[str, list[tuple[str, float, float, float, float]]] = {}
    for b in bboxes.itertuples(index=False):
        boxes_by_image.setdefault(b.image_index, []).append((b.finding, b.x, b.y, b.w, b.h))
    specs = []
    columns = [
        "Image Index",
        "Finding Labels",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    ]
    for image, findings, pid, age, sex, view in rows[columns].itertuples(index=False):
        specs.append(
            RenderSpec(
                patient_seed=stable_int(seed, "patient", pid),
                image_seed=stable_int(seed, "image", image),
                labels=tuple(x for x in findings.split("|") if x in FINDINGS),
                boxes=tuple(boxes_by_image.get(image, ())),
                view=view,
                age=float(age) if age.strip().isdigit() else 50.0,
                sex=sex,
                scanner=scanner_for(pid, view, seed),
                miss_prob=cfg.miss_prob,
            )
        )
    return specs


@dataclass(frozen=True)
class _Job:
    spec: RenderSpec
    path: str


def _render_one(job: _Job) -> tuple[str, ...]:
    # Our own encoder, not PIL's: its bytes do not depend on the machine's zlib (see synth.png).
    Path(job.path).write_bytes(encode_gray_png(render(job.spec, IMAGE_SIZE)))
    return drawn_findings(job.spec)


def write_nih_csv(rows: pd.DataFrame, path: Path) -> None:
    """NIH's 2017 layout: the header ends with a comma (an empty trailing column)."""
    text = rows.to_csv(index=False, lineterminator="\n")
    lines = text.splitlines()
    path.write_text("\n".join(line + "," for line in lines) + "\n")


def synthesize(out_dir: Path, cfg: SyntheticConfig, seed: int) -> dict:
    """Write an NIH-format folder (metadata CSV + 1024x1024 PNGs) and return its summary."""
    raw = pd.read_csv(embedded_metadata_path(), dtype=str, keep_default_na=False)
    rows = sample_by_patient(first_visits(raw, cfg.max_per_patient), cfg.n_images, seed, cfg.enrich)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True)
    write_nih_csv(rows, out_dir / METADATA_NAME)
    specs = build_specs(rows, read_bboxes(), cfg, seed)
    jobs = [_Job(s, str(images / name)) for s, name in zip(specs, rows["Image Index"], strict=True)]
    drawn_counts = dict.fromkeys(FINDINGS, 0)
    for drawn in pmap(
        _render_one, jobs, total=len(jobs), workers=cfg.workers, desc="synthesize", chunksize=8
    ):
        for finding in drawn:
            drawn_counts[finding] += 1
    labelled = {
        f: int(rows["Finding Labels"].str.split("|").map(lambda ls, f=f: f in ls).sum())
        for f in FINDINGS
    }
    summary = {
        "source": "NIH ChestX-ray14 metadata shipped in the torchxrayvision wheel "
        "(Data_Entry_2017_v2020.csv.gz); pixels are synthetic",
        "seed": seed,
        "config": cfg.model_dump(mode="json", exclude={"workers"}),
        "images": len(rows),
        "patients": int(rows["Patient ID"].nunique()),
        "image_size": IMAGE_SIZE,
        "labelled": labelled,
        "drawn_in_pixels": drawn_counts,
    }
    (out_dir / "SYNTHETIC.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def write_placeholder(out_dir: Path, nih_dir: str) -> None:
    """With data.source=nih nothing is rendered; the folder only says so."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    note = {"source": "nih", "nih_dir": nih_dir, "note": "data.source is 'nih': nothing rendered"}
    (out_dir / "SYNTHETIC.json").write_text(json.dumps(note, indent=2, sort_keys=True) + "\n")
