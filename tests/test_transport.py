"""Weights on the wire: safetensors chunks with SHA-256, over a real gRPC stream on loopback."""

import filecmp
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from fedcxr.federation.proto import fedcxr_pb2 as pb
from fedcxr.federation.proto import fedcxr_pb2_grpc as pb_grpc
from fedcxr.federation.transport import (
    TransferError,
    bytes_to_state,
    file_chunks,
    from_chunks,
    receive_to_file,
    sha256_hex,
    state_to_bytes,
    to_chunks,
)
from fedcxr.tensorfile import LazyState, TensorFileError, file_sha256, write_state_file

REPO = Path(__file__).resolve().parents[1]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(16, 1, 3, 3, generator=g),
        "bn.running_mean": torch.randn(16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": torch.randn(14, 300, generator=g).t(),  # non-contiguous on purpose
    }


def test_state_round_trip_is_exact_and_deterministic():
    state = _state()
    data = state_to_bytes(state)
    assert data == state_to_bytes(_state())
    back = bytes_to_state(data)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value) and back[key].dtype == value.dtype


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 10_000])
def test_chunks_reassemble_with_header(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    header = pb.UpdateHeader(round=3, n_examples=120, metrics_json='{"loss": 0.5}')
    chunks = list(to_chunks(data, header, chunk_bytes=4096))
    assert all(len(c.data) <= 4096 for c in chunks)
    got_header, got = from_chunks(chunks)
    assert got == data and got_header.n_examples == 120 and got_header.round == 3
    assert chunks[-1].sha256 == sha256_hex(data)


def test_damaged_streams_are_refused():
    data = state_to_bytes(_state())
    chunks = list(to_chunks(data, chunk_bytes=1000))
    tampered = [pb.Chunk() for _ in chunks]
    for dst, src in zip(tampered, chunks, strict=True):
        dst.CopyFrom(src)
    tampered[1].data = bytes(len(tampered[1].data))
    with pytest.raises(TransferError, match="SHA-256 mismatch"):
        from_chunks(tampered)
    with pytest.raises(TransferError, match="offset"):
        from_chunks(chunks[:1] + chunks[2:])
    with pytest.raises(TransferError, match="cut short"):
        from_chunks(chunks[:-1])
    with pytest.raises(TransferError, match="limit"):
        from_chunks(chunks, max_bytes=100)
    with pytest.raises(TransferError, match="empty"):
        from_chunks([])
    with pytest.raises(TransferError, match="safetensors"):
        bytes_to_state(b"not a model")


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.uploaded: bytes | None = None

    def DownloadModel(self, request, context):
        yield from to_chunks(self.payload, chunk_bytes=64 * 1024)

    def UploadUpdate(self, request_iterator, context):
        header, data = from_chunks(request_iterator)
        self.uploaded = data
        return pb.UploadReply(accepted=True, sha256=sha256_hex(data), reason=str(header.round))


def test_weights_stream_over_real_grpc_in_both_directions():
    big = {"w": torch.randn(1200, 1000)}  # about 4.8 MB: above gRPC's 4 MiB message limit
    payload = state_to_bytes(big)
    servicer = _Servicer(payload)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FederationStub(channel)
            _, data = from_chunks(stub.DownloadModel(pb.ModelRequest(round=1), timeout=30))
            assert torch.equal(bytes_to_state(data)["w"], big["w"])
            reply = stub.UploadUpdate(
                to_chunks(payload, pb.UpdateHeader(round=2, n_examples=5)), timeout=30
            )
            assert reply.accepted and reply.sha256 == sha256_hex(payload) and reply.reason == "2"
            assert servicer.uploaded == payload
    finally:
        server.stop(None)


def test_generated_stubs_match_the_proto(tmp_path):
    """The committed stubs are what scripts/gen_proto.sh makes from fedcxr.proto today."""
    pytest.importorskip("grpc_tools")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(["bash", "scripts/gen_proto.sh", str(tmp_path)], cwd=REPO, check=True, env=env)
    for name in ("fedcxr_pb2.py", "fedcxr_pb2.pyi", "fedcxr_pb2_grpc.py"):
        assert filecmp.cmp(
            tmp_path / "fedcxr/federation/proto" / name,
            REPO / "src/fedcxr/federation/proto" / name,
            shallow=False,
        ), f"{name} is stale: run scripts/gen_proto.sh"


def _mixed_state() -> dict[str, torch.Tensor]:
    state = _state()
    state["half"] = torch.linspace(-1, 1, 5).to(torch.bfloat16)
    state["mask"] = torch.tensor([True, False, True])
    state["empty"] = torch.zeros(0, 3)
    state["scalar"] = torch.tensor(2.5)
    return state


def test_write_state_file_matches_safetensors_byte_for_byte(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _mixed_state()
    for meta in (None, {"fedcxr": '{"round": 3}'}):
        ours, theirs = tmp_path / "ours.st", tmp_path / "theirs.st"
        write_state_file(ours, state, meta)
        save_file({k: v.contiguous() for k, v in state.items()}, str(theirs), metadata=meta)
        assert ours.read_bytes() == theirs.read_bytes()


def test_lazy_state_reads_each_tensor_exactly_and_rejects_damage(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "m.st"
    write_state_file(path, state)
    lazy = LazyState(path)
    assert sorted(lazy) == sorted(state) and len(lazy) == len(state)
    for key, tensor in state.items():
        assert lazy.spec(key) == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(lazy[key], tensor)
    lazy.close()
    data = path.read_bytes()
    (tmp_path / "cut.st").write_bytes(data[:-4])
    (tmp_path / "junk.st").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    (tmp_path / "tiny.st").write_bytes(b"abc")
    for name, why in [("cut.st", "data ends"), ("junk.st", "not JSON"), ("tiny.st", "shorter")]:
        with pytest.raises(TensorFileError, match=why):
            LazyState(tmp_path / name)


def test_receive_to_file_streams_checks_and_cleans_up(tmp_path: Path) -> None:
    data = state_to_bytes(_state())
    header = pb.UpdateHeader(round=2, n_examples=9)
    seen = []
    dest = tmp_path / "up.st"
    got_header, size, digest = receive_to_file(
        to_chunks(data, header, chunk_bytes=1000), dest, on_header=seen.append
    )
    assert (got_header.round, size, digest) == (2, len(data), sha256_hex(data))
    assert dest.read_bytes() == data and file_sha256(dest) == digest and len(seen) == 1
    # The file streams back out as the same chunks.
    assert from_chunks(file_chunks(dest, digest, chunk_bytes=777))[1] == data
    chunks = list(to_chunks(data, header, chunk_bytes=1000))
    chunks[3].data = b"x" * len(chunks[3].data)
    with pytest.raises(TransferError, match="SHA-256"):
        receive_to_file(chunks, dest)
    assert not dest.exists()
