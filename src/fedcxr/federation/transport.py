"""Model weights on the wire: safetensors bytes in checked, chunked gRPC streams (no pickle)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcxr.federation.proto import fedcxr_pb2 as pb
from fedcxr.tensorfile import State

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
MAX_TRANSFER_BYTES = 2 << 30


class TransferError(ValueError):
    """A stream that is incomplete, out of order, oversized or fails its SHA-256."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_to_bytes(state: State) -> bytes:
    """Serialize a state dict with safetensors (tensors made contiguous, on the CPU)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def bytes_to_state(data: bytes) -> State:
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise TransferError(f"not a valid safetensors payload ({len(data)} bytes): {exc}") from exc


def to_chunks(
    data: bytes,
    header: pb.UpdateHeader | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.Chunk]:
    """Split a payload into chunks; the first carries the header, the last the SHA-256."""
    total = len(data)
    digest = sha256_hex(data)
    offsets = range(0, total, chunk_bytes) if total else range(1)
    last = offsets[-1]
    for offset in offsets:
        chunk = pb.Chunk(data=data[offset : offset + chunk_bytes], offset=offset, total_bytes=total)
        if offset == 0 and header is not None:
            chunk.header.CopyFrom(header)
        if offset == last:
            chunk.sha256 = digest
        yield chunk


def file_chunks(path: Path, digest: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Stream a file as chunks (one chunk in memory at a time); `digest` is its SHA-256."""
    total = path.stat().st_size
    with path.open("rb") as fh:
        offset = 0
        while True:
            data = fh.read(chunk_bytes)
            last = offset + len(data) >= total
            chunk = pb.Chunk(data=data, offset=offset, total_bytes=total)
            if last:
                chunk.sha256 = digest
            yield chunk
            offset += len(data)
            if last:
                return


class _StreamCheck:
    """Order, size and SHA-256 checks on an incoming stream, chunk by chunk."""

    def __init__(self, max_bytes: int, what: str) -> None:
        self.max_bytes, self.what = max_bytes, what
        self.header: pb.UpdateHeader | None = None
        self.received, self.total, self.digest = 0, None, ""
        self.count = 0
        self._sha = hashlib.sha256()

    def feed(self, chunk: pb.Chunk) -> bytes:
        what, i = self.what, self.count
        if i == 0:
            self.total = chunk.total_bytes
            if self.total > self.max_bytes:
                raise TransferError(
                    f"{what}: announces {self.total} bytes, limit is {self.max_bytes}"
                )
            if chunk.HasField("header"):
                self.header = chunk.header
        if chunk.total_bytes != self.total:
            raise TransferError(
                f"{what}: chunk {i} says total {chunk.total_bytes}, first said {self.total}"
            )
        if chunk.offset != self.received:
            raise TransferError(
                f"{what}: chunk {i} at offset {chunk.offset}, expected {self.received}"
            )
        self.received += len(chunk.data)
        if self.received > (self.total or 0):
            raise TransferError(
                f"{what}: received {self.received} bytes, more than announced {self.total}"
            )
        if chunk.sha256:
            self.digest = chunk.sha256
        self._sha.update(chunk.data)
        self.count += 1
        return chunk.data

    def finish(self) -> str:
        """Raise unless the stream was complete and matched its SHA-256; return the digest."""
        what = self.what
        if self.total is None:
            raise TransferError(f"{what}: empty stream")
        if self.received != self.total:
            raise TransferError(
                f"{what}: received {self.received} of {self.total} bytes (stream cut short)"
            )
        actual = self._sha.hexdigest()
        if self.digest != actual:
            raise TransferError(
                f"{what}: SHA-256 mismatch (announced {self.digest or 'none'}, got {actual})"
            )
        return actual


def from_chunks(
    chunks: Iterable[pb.Chunk], max_bytes: int = MAX_TRANSFER_BYTES, what: str = "transfer"
) -> tuple[pb.UpdateHeader | None, bytes]:
    """Reassemble a stream, checking order, size and the SHA-256; return (header, payload)."""
    check = _StreamCheck(max_bytes, what)
    parts = [check.feed(chunk) for chunk in chunks]
    check.finish()
    return check.header, b"".join(parts)


def receive_to_file(
    chunks: Iterable[pb.Chunk],
    dest: Path,
    max_bytes: int = MAX_TRANSFER_BYTES,
    what: str = "transfer",
    on_header: Callable[[pb.UpdateHeader], None] | None = None,
) -> tuple[pb.UpdateHeader | None, int, str]:
    """Write a stream to `dest` with the same checks as from_chunks, one chunk in memory at a
    time; return (header, bytes, SHA-256). `dest` is removed when the stream is refused."""
    check = _StreamCheck(max_bytes, what)
    try:
        with dest.open("wb") as fh:
            for chunk in chunks:
                fh.write(check.feed(chunk))
                if check.count == 1 and check.header is not None and on_header is not None:
                    on_header(check.header)
        digest = check.finish()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return check.header, check.received, digest
