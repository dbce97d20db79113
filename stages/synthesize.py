"""DVC stage `synthesize`: the embedded default NIH-format folder (a stub when source=nih)."""

from pathlib import Path

from fedcxr.config import Params
from fedcxr.stageio import run_stage
from fedcxr.synthesize import synthesize, write_placeholder

OUT = Path("data/raw/synthetic")


def main(params: Params) -> None:
    if params.data.source == "nih":
        write_placeholder(OUT, params.data.nih_dir)
        return
    summary = synthesize(OUT, params.data.synthetic, params.seed)
    print(f"synthesize: {summary['images']} images of {summary['patients']} patients -> {OUT}")


if __name__ == "__main__":
    run_stage("synthesize", main)
