"""DVC stage `synthesize`: the embedded default NIH-format folder (a stub when source=nih)."""

from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import Params
from fedcxr.stageio import stage_cli
from fedcxr.synthesize import synthesize, write_placeholder


def main(
    params: Params,
    out: Annotated[Path, typer.Option(help="The NIH-format folder to write.")],
) -> None:
    """Write data.synthetic.n_images synthetic chest X-rays with real NIH metadata rows."""
    if params.data.source == "nih":
        write_placeholder(out, params.data.nih_dir)
        return
    summary = synthesize(out, params.data.synthetic, params.seed)
    print(f"synthesize: {summary['images']} images of {summary['patients']} patients -> {out}")


if __name__ == "__main__":
    stage_cli("synthesize", main)
