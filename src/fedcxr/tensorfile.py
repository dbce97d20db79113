"""Model weights as safetensors files: written one tensor at a time, read one tensor at a time."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

State = dict[str, torch.Tensor]  # a model's weights by parameter/buffer name
MODEL = "model.safetensors"  # the weights file in every run folder
HASH_BLOCK = 1 << 20


class TensorFileError(ValueError):
    """A file that is not a valid safetensors file (says why, and its size)."""


def file_sha256(path: Path, block: int = HASH_BLOCK) -> str:
    """SHA-256 of a file, read `block` bytes at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while data := fh.read(block):
            digest.update(data)
    return digest.hexdigest()


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
    dtype); anything else is a TensorFileError.
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

    def _invalid(self, why: str) -> TensorFileError:
        size = self.path.stat().st_size
        return TensorFileError(f"not a valid safetensors payload ({size} bytes): {why}")

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
