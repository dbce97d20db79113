"""A real federation on this machine's GPU: round times, GPU utilization, memory per site process.

Builds five site folders of random images, runs `run_federation` (five site processes, mutual
TLS) and samples `nvidia-smi` every second: the GPU's utilization and memory, and each site
process's own memory (`--query-compute-apps`). Prints one JSON line per round and a last JSON
line with `gpu_util_mean`, `gpu_peak_mib` and `site_peak_mib` (per process). Without a GPU it
runs on the CPU and reports no GPU figures (a dry run of the script itself).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from bench_train import site_folder

from fedcxr.config import Params, load_params
from fedcxr.federation.runner import run_federation

app = typer.Typer(add_completion=False, rich_markup_mode=None)
Opt = typer.Option
SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")


def make_sites(root: Path, n: int, size: int) -> Path:
    """Five site folders of n random size x size images (one in ten in the val split)."""
    for k, site in enumerate(SITES):
        site_folder(root / site, n, size, seed=k, val_every=10, tag=f"{k}_")
    return root


def _smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[v.strip() for v in line.split(",")] for line in out.strip().splitlines() if line]


class GpuWatch:
    """Samples the GPU once a second in a thread until stopped."""

    def __init__(self) -> None:
        self.util: list[int] = []
        self.gpu_peak_mib = 0
        self.process_peak_mib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for used, util in _smi("--query-gpu=memory.used,utilization.gpu"):
                    self.gpu_peak_mib = max(self.gpu_peak_mib, int(used))
                    self.util.append(int(util))
                for pid, used in _smi("--query-compute-apps=pid,used_memory"):
                    self.process_peak_mib[pid] = max(self.process_peak_mib.get(pid, 0), int(used))
            except (OSError, subprocess.CalledProcessError, ValueError):
                pass  # no GPU, or nvidia-smi missing: nothing to sample
            self._stop.wait(1.0)

    def __enter__(self) -> GpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@app.command()
def main(
    arch: Annotated[str, Opt(help="Model.")] = "resnet50",
    size: Annotated[int, Opt(help="Stored and training size.")] = 512,
    per_site: Annotated[int, Opt(help="Images per site.")] = 320,
    rounds: Annotated[int, Opt(help="Federated rounds.")] = 2,
    workers: Annotated[str, Opt(help="train.num_workers: a count or auto.")] = "auto",
    compile_: Annotated[bool, Opt("--compile", help="train.compile.")] = False,
    params: Annotated[Path, Opt(help="params.yaml for the rest.")] = Path("params.yaml"),
) -> None:
    """Run one federation of five site processes and report what the GPU did."""
    base = load_params(params) if params.is_file() else Params()
    data = base.model_dump(mode="json")
    data["model"]["arch"] = arch
    data["resize"]["size"] = size
    data["train"].update(
        image_size=size,
        num_workers=int(workers) if workers.isdigit() else workers,
        compile=compile_,
    )
    data["fl"]["rounds"] = rounds
    data["dp"]["enabled"] = False
    p = Params.model_validate(data)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-fed-") as tmp:
        sites = make_sites(Path(tmp) / "sites", per_site, size)
        start = time.perf_counter()
        with GpuWatch() as watch:
            result = run_federation(p, sites, Path(tmp) / "out", Path(tmp) / "pki", resume=False)
        wall = time.perf_counter() - start
    for record in result.to_json()["per_round"]:
        print(
            json.dumps(
                {
                    "round": record["round"],
                    "wall_s": record["wall_s"],
                    "epoch_s": {s: v["epoch_seconds"] for s, v in record["sites"].items()},
                    "val_auroc": record["val_auroc"],
                }
            )
        )
    util = watch.util or [0]
    print(
        json.dumps(
            {
                "arch": arch,
                "size": size,
                "per_site": per_site,
                "rounds": rounds,
                "wall_s": round(wall, 1),
                "audit_ok": result.summary.audit_ok,
                "gpu_samples": len(watch.util),
                "gpu_util_mean": round(sum(util) / len(util), 1),
                "gpu_peak_mib": watch.gpu_peak_mib,
                "site_peak_mib": sorted(watch.process_peak_mib.values()),
            }
        )
    )


if __name__ == "__main__":
    app()
