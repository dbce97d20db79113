"""DVC stage `resize`: decode each image once into resize.size x resize.size uint8 shards."""

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from fedcxr.config import Params
from fedcxr.resize import resize_all
from fedcxr.sources import source_root
from fedcxr.stageio import stage_cli


def main(
    params: Params,
    manifest: Annotated[Path, typer.Option(help="ingest's manifest.csv.")],
    metadata: Annotated[Path, typer.Option(help="deid's metadata.csv.")],
    out: Annotated[Path, typer.Option(help="Folder for the resized uint8 shards.")],
) -> None:
    """Decode each image once, resized to resize.size x resize.size, into shards."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    meta = pd.read_csv(metadata, dtype={"image_id": str, "patient_id": str})
    root = source_root(params.data.source, params.data.nih_dir)
    summary = resize_all(root, table, meta, params.resize, out)
    print(
        f"resize: {summary['images']} images at {summary['size']}px in "
        f"{len(summary['shards'])} shard(s) -> {out}"
    )


if __name__ == "__main__":
    stage_cli("resize", main)
