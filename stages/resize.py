"""DVC stage `resize`: decode each image once into resize.size x resize.size uint8 shards."""

from pathlib import Path

import pandas as pd

from fedcxr.config import Params
from fedcxr.resize import resize_all
from fedcxr.sources import source_root
from fedcxr.stageio import run_stage

MANIFEST = Path("data/ingest/manifest.csv")
METADATA = Path("data/deid/metadata.csv")
OUT = Path("data/resized")


def main(params: Params) -> None:
    manifest = pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)
    metadata = pd.read_csv(METADATA, dtype={"image_id": str, "patient_id": str})
    summary = resize_all(
        source_root(params.data.source, params.data.nih_dir), manifest, metadata, params.resize, OUT
    )
    print(
        f"resize: {summary['images']} images at {summary['size']}px in "
        f"{len(summary['shards'])} shard(s) -> {OUT}"
    )


if __name__ == "__main__":
    run_stage("resize", main)
