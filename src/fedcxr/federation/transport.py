"""Model weights on the wire: safetensors bytes in checked, chunked gRPC streams (no pickle)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcxr.federation.proto import fedcxr_pb2 as pb

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


def file_sha256(path: Path, block: int = CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while data := fh.read(block):
            digest.update(data)
    return digest.hexdigest()


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


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors format).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20


# safetensors' own file order: by dtype (this rank, largest first), then by name.
_DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_state_file(
    path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `state` as a safetensors file one tensor at a time (byte-identical to
    safetensors.torch.save_file, which first copies every tensor into a bytes object: twice
    the model in memory). Tensors are written from CPU, contiguous."""
    names = {}
    for key, tensor in state.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: dtype {tensor.dtype} has no safetensors name")
        names[key] = _DTYPE_NAMES[tensor.dtype]
    order = sorted(state, key=lambda k: (-_DTYPE_ORDER.index(names[k]), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key in order:
        tensor = state[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[key],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for key in order:
            tensor = state[key].detach().to("cpu").contiguous()
            if tensor.numel():
                fh.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


class LazyState(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only state dict that reads one tensor per access.

    Aggregating N updates this way holds one tensor per update at a time instead of N models.
    Written by hand rather than with `safetensors.safe_open` because safe_open maps the file:
    every page a read touches stays resident while the handle is open, so N open updates would
    again cost N models of resident memory. Here each access is one positioned read (pread).
    The header is checked against the format (offsets in bounds, contiguous, sizes = shape x
    dtype); anything else is a TransferError.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries, self._data_start = self._parse()
        except BaseException:
            self.close()
            raise

    def _invalid(self, why: str) -> TransferError:
        size = self.path.stat().st_size
        return TransferError(f"not a valid safetensors payload ({size} bytes): {why}")

    def _parse(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], int]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._invalid("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise self._invalid(f"header length {n} does not fit the file")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except ValueError as exc:
            raise self._invalid(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._invalid("header is not a JSON object")
        header.pop("__metadata__", None)
        entries = {}
        spans = []
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._invalid(f"tensor {key!r}: bad entry {info!r}") from None
            expected = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or end - begin != expected or begin < 0:
                raise self._invalid(f"tensor {key!r}: {end - begin} bytes for {shape} {dtype}")
            entries[key] = (dtype, shape, begin, end)
            spans.append((begin, end))
        position = 0
        for begin, end in sorted(spans):
            if begin != position:
                raise self._invalid(f"tensor data not contiguous at byte {begin}")
            position = end
        if 8 + n + position != size:
            raise self._invalid(f"data ends at byte {8 + n + position}, file has {size}")
        return entries, 8 + n

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:  # read straight into the tensor's memory: one copy, no bytes object
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            got = os.preadv(self._fd, [view], self._data_start + begin)
            if got != end - begin:
                raise self._invalid(f"tensor {key!r}: read {got} of {end - begin} bytes")
        return tensor

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of a tensor, from the header (nothing read)."""
        dtype, shape, _, _ = self._entries[key]
        return dtype, shape

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
