"""Benchmark: one federated round's non-training cost with ResNet-50-sized weights on loopback.

Usage: python benchmarks/bench_federation.py [--sites 5 20] [--arch resnet50]
(`--sites 5 --sites 20` works too.)

For each site count: the aggregator runs in its own process (so its memory is measured alone),
sites run as threads that return the received weights unchanged (no training), all over mutual
TLS on 127.0.0.1. Prints the round's wall time, the achieved MB/s (bytes down + up over the
round), raw gRPC loopback throughput with the same TLS and chunking in the same run, and the
aggregator's peak RSS (VmHWM) growth over its idle baseline as a multiple of the model size.
Targets: >= 0.5x raw throughput; aggregator peak < 3x model size, flat in the site count.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Annotated

import grpc
import torch
import typer

from fedcxr.federation.audit import AuditLog
from fedcxr.federation.pki import ensure_federation, load_bundle
from fedcxr.federation.proto import fedcxr_pb2 as pb
from fedcxr.federation.proto import fedcxr_pb2_grpc as pb_grpc
from fedcxr.federation.protocol import channel_credentials, server_credentials
from fedcxr.federation.server import serve
from fedcxr.federation.site import run_site
from fedcxr.federation.state import FederationState
from fedcxr.federation.transport import from_chunks, state_to_bytes, to_chunks
from fedcxr.models import build_model

MB = 1e6


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    """Restart the peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0).

    ru_maxrss would not do: after a spawn's exec it still holds the RSS the forked parent
    had, which here includes the site threads of the previous runs.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _aggregator(conn, pki: str, sites: list[str], arch: str, out: str) -> None:
    torch.manual_seed(0)
    state = build_model(arch, 14).state_dict()
    _reset_peak()
    baseline = _status_mb("VmRSS")
    fed = FederationState(
        state,
        sites=sites,
        rounds=1,
        strategy="fedavg",
        round_config={},
        audit=AuditLog(Path(out) / "audit.jsonl"),
        checkpoint=Path(out) / "ckpt.safetensors",
    )
    server, port = serve(fed, load_bundle(Path(pki), "aggregator"), poll_s=0.5)
    conn.send(port)
    fed.wait(timeout=1800, stop_grace_s=5)
    server.stop(2).wait()
    conn.send(
        {
            "baseline_mb": baseline,
            "peak_mb": _status_mb("VmHWM"),
            "wall_s": fed.timings[0].wall_s,
        }
    )


def _identity(state, rnd, config):
    return state, 100, {}


class _Raw(pb_grpc.FederationServicer):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def DownloadModel(self, request, context):
        yield from to_chunks(self.payload)


def raw_throughput(pki: Path, payload: bytes, repeats: int = 3) -> float:
    """MB/s of one chunked TLS stream of the same bytes, no federation logic (best of N)."""
    tls = load_bundle(pki, "aggregator")
    creds = server_credentials(tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FederationServicer_to_server(_Raw(payload), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    site = load_bundle(pki, "site-001")
    channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(site))
    best = 0.0
    try:
        stub = pb_grpc.FederationStub(channel)
        for _ in range(repeats):
            start = time.perf_counter()
            from_chunks(stub.DownloadModel(pb.ModelRequest(round=1), timeout=600))
            best = max(best, len(payload) / MB / (time.perf_counter() - start))
    finally:
        channel.close()
        server.stop(None)
    return best


def bench(n_sites: int, arch: str, pki: Path, work: Path) -> dict:
    sites = [f"site-{i:03d}" for i in range(1, n_sites + 1)]
    ensure_federation(pki, sites)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_aggregator, args=(child, str(pki), sites, arch, str(work)))
    proc.start()
    port = parent.recv()
    threads = [
        threading.Thread(
            target=run_site,
            args=(f"127.0.0.1:{port}", load_bundle(pki, s), 100, 10, _identity),
            kwargs={"poll_deadline_s": 30},
        )
        for s in sites
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = parent.recv()
    proc.join()
    return result


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command()
def main(
    sites: Annotated[
        list[int] | None,
        typer.Option(
            "--sites",
            help="Site counts to benchmark, one federated round each (default: 5 20). "
            "Repeat the option (--sites 5 --sites 20) or list the counts after it (--sites 5 20).",
        ),
    ] = None,
    more_sites: Annotated[
        list[int] | None,
        typer.Argument(
            metavar="MORE_SITES",
            help="Further site counts, so that `--sites 5 20` takes both counts as it always has.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        str, typer.Option(help="Registered model whose weights are sent (smallcnn is quickest).")
    ] = "resnet50",
) -> None:
    """One federated round's non-training cost per site count, over mutual TLS on loopback.

    The aggregator runs in its own process, the sites as threads that send the received weights
    back unchanged. Prints the round's wall time and MB/s against raw gRPC+TLS loopback
    throughput (target >= 0.5x), and the aggregator's peak RSS growth as a multiple of the
    model size (target < 3x, flat in the site count).
    """
    site_counts = [*(sites or []), *(more_sites or [])] or [5, 20]
    payload = state_to_bytes(build_model(arch, 14).state_dict())
    model_mb = len(payload) / MB
    with tempfile.TemporaryDirectory(prefix="fedcxr-bench-") as tmp:
        pki = Path(tmp) / "pki"
        ensure_federation(pki, [f"site-{i:03d}" for i in range(1, max(site_counts) + 1)])
        raw = raw_throughput(pki, payload)
        print(f"model {arch}: {model_mb:.1f} MB; raw gRPC+TLS loopback {raw:.0f} MB/s")
        for n in site_counts:
            work = Path(tmp) / f"run{n}"
            work.mkdir()
            r = bench(n, arch, pki, work)
            moved = 2 * n * model_mb
            rate = moved / r["wall_s"]
            growth = r["peak_mb"] - r["baseline_mb"]
            print(
                f"{n:3d} sites: round {r['wall_s']:.1f}s (no training), {rate:.0f} MB/s "
                f"({rate / raw:.2f}x raw; target >= 0.5x); aggregator peak +{growth:.0f} MB "
                f"= {growth / model_mb:.1f}x model (target < 3x, flat in sites)"
            )


if __name__ == "__main__":
    app()
