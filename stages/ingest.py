"""DVC stage `ingest`: check and hash every image of the source folder into a manifest."""

from pathlib import Path

from fedcxr.config import Params
from fedcxr.ingest import IngestError, ingest
from fedcxr.sources import source_root
from fedcxr.stageio import run_stage, write_json

OUT = Path("data/ingest")
REPORT = Path("reports/ingest.json")


def main(params: Params) -> None:
    root = source_root(params.data.source, params.data.nih_dir)
    try:
        manifest, report = ingest(root, params.ingest)
    except IngestError as exc:
        if hasattr(exc, "report"):
            write_json(REPORT, exc.report)
        raise
    OUT.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(OUT / "manifest.csv", index=False, lineterminator="\n")
    write_json(REPORT, report)
    print(
        f"ingest: {report['usable']} usable of {report['metadata_rows']} rows; "
        f"{report['problems']['count']} problem(s) -> {OUT / 'manifest.csv'}, {REPORT}"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
