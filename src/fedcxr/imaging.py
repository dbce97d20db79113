"""PNG decoding to 8-bit grayscale and PNG metadata-chunk reading, shared by ingest and resize."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary chunks that can carry text, dates or camera/device data (de-identification looks
# at these). PIL does not expose tIME, so chunks are walked here directly.
METADATA_CHUNKS = frozenset({"tEXt", "zTXt", "iTXt", "eXIf", "tIME"})


@dataclass(frozen=True)
class PngChunk:
    """One metadata chunk: its type, keyword (for text chunks), decoded text and raw data.

    Held in memory only: the text may be PHI, so neither it nor the raw data is in the repr
    (a log line or traceback that prints a chunk shows its type and keyword only).
    """

    type: str
    keyword: str
    text: str = field(repr=False)
    data: bytes = field(default=b"", compare=False, repr=False)  # the chunk's data as stored


@dataclass(frozen=True)
class ChunkScan:
    chunks: tuple[PngChunk, ...]
    is_png: bool
    complete: bool  # False when the data ends before IEND (a truncated file)


def _text_of(ctype: str, body: bytes) -> tuple[str, str]:
    if ctype == "tIME" and len(body) == 7:
        year, month, day, hour, minute, second = struct.unpack(">HBBBBB", body)
        return "", f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
    if ctype == "eXIf":
        printable = bytes(b if 32 <= b < 127 else 32 for b in body).decode("ascii")
        return "", " ".join(printable.split())
    keyword, _, rest = body.partition(b"\0")
    key = keyword.decode("latin-1")
    try:
        if ctype == "tEXt":
            return key, rest.decode("latin-1")
        if ctype == "zTXt":
            return key, zlib.decompress(rest[1:]).decode("latin-1")
        # iTXt: compression flag, method, language\0, translated keyword\0, text
        flag = rest[0]
        _lang, _, rest = rest[2:].partition(b"\0")
        _tkey, _, text = rest.partition(b"\0")
        return key, (zlib.decompress(text) if flag else text).decode("utf-8", "replace")
    except (zlib.error, IndexError) as exc:
        return key, f"<undecodable {ctype}: {exc}>"


def scan_chunks(data: bytes) -> ChunkScan:
    """Walk a PNG's chunk list; collect metadata chunks and whether IEND was reached."""
    if not data.startswith(PNG_SIGNATURE):
        return ChunkScan((), is_png=False, complete=False)
    pos, found = len(PNG_SIGNATURE), []
    while pos + 8 <= len(data):
        length, raw_type = struct.unpack(">I4s", data[pos : pos + 8])
        ctype = raw_type.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            break
        if ctype in METADATA_CHUNKS:
            body = data[pos + 8 : pos + 8 + length]
            keyword, text = _text_of(ctype, body)
            found.append(PngChunk(ctype, keyword, text, body))
        if ctype == "IEND":
            return ChunkScan(tuple(found), is_png=True, complete=True)
        pos = end
    return ChunkScan(tuple(found), is_png=True, complete=False)


def open_image(data: bytes) -> Image.Image:
    """Decode fully (raises OSError/ValueError on damaged data)."""
    image = Image.open(BytesIO(data))
    image.load()
    return image


def to_gray8(image: Image.Image) -> np.ndarray:
    """8-bit grayscale pixels. RGB(A) -> luma (alpha dropped); 16-bit -> min-max stretched."""
    if image.mode == "L":
        return np.asarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return np.rint(scaled).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB" if image.mode != "LA" else "L")
    return np.asarray(image.convert("L"))


def needs_conversion(mode: str) -> bool:
    return mode != "L"
