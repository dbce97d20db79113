"""Model weights on the wire: safetensors bytes in checked, chunked gRPC streams (no pickle)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcxr.proto import fedcxr_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
MAX_TRANSFER_BYTES = 2 << 30


class TransferError(ValueError):
    """A stream that is incomplete, out of order, oversized or fails its SHA-256."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialize a state dict with safetensors (tensors made contiguous, on the CPU)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def bytes_to_state(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise TransferError(f"not a valid safetensors payload ({len(data)} bytes): {exc}") from exc


def to_chunks(
    data: bytes, header: pb.UpdateHeader | None = None, chunk_bytes: int = CHUNK_BYTES
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


def from_chunks(
    chunks: Iterable[pb.Chunk], max_bytes: int = MAX_TRANSFER_BYTES, what: str = "transfer"
) -> tuple[pb.UpdateHeader | None, bytes]:
    """Reassemble a stream, checking order, size and the SHA-256; return (header, payload)."""
    parts: list[bytes] = []
    header: pb.UpdateHeader | None = None
    received, total, digest = 0, None, ""
    for i, chunk in enumerate(chunks):
        if i == 0:
            total = chunk.total_bytes
            if total > max_bytes:
                raise TransferError(f"{what}: announces {total} bytes, limit is {max_bytes}")
            if chunk.HasField("header"):
                header = chunk.header
        if chunk.total_bytes != total:
            raise TransferError(
                f"{what}: chunk {i} says total {chunk.total_bytes}, first said {total}"
            )
        if chunk.offset != received:
            raise TransferError(f"{what}: chunk {i} at offset {chunk.offset}, expected {received}")
        parts.append(chunk.data)
        received += len(chunk.data)
        if received > (total or 0):
            raise TransferError(f"{what}: received {received} bytes, more than announced {total}")
        if chunk.sha256:
            digest = chunk.sha256
    if total is None:
        raise TransferError(f"{what}: empty stream")
    if received != total:
        raise TransferError(f"{what}: received {received} of {total} bytes (stream cut short)")
    data = b"".join(parts)
    actual = sha256_hex(data)
    if digest != actual:
        raise TransferError(
            f"{what}: SHA-256 mismatch (announced {digest or 'none'}, got {actual})"
        )
    return header, data
