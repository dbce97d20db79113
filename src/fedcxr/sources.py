"""Iterates the images of an NIH-format folder: loose PNGs, or .tar.gz archives read in place."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# NIH's published MD5 sums of the twelve image archives (ChestX-ray14 FAQ, Q07).
NIH_ARCHIVE_MD5: dict[str, str] = {
    "images_001.tar.gz": "fe8ed0a6961412fddcbb3603c11b3698",
    "images_002.tar.gz": "ab07a2d7cbe6f65ddd97b4ed7bde10bf",
    "images_003.tar.gz": "2301d03bde4c246388bad3876965d574",
    "images_004.tar.gz": "9f1b7f5aae01b13f4bc8e2c44a4b8ef6",
    "images_005.tar.gz": "1861f3cd0ef7734df8104f2b0309023b",
    "images_006.tar.gz": "456b53a8b351afd92a35bc41444c58c8",
    "images_007.tar.gz": "1075121ea20a137b87f290d6a4a5965e",
    "images_008.tar.gz": "b61f34cec3aa69f295fbb593cbd9d443",
    "images_009.tar.gz": "442a3caa61ae9b64e61c561294d1e183",
    "images_010.tar.gz": "09ec81c4c31e32858ad8cf965c494b74",
    "images_011.tar.gz": "499aefc67207a5a97692424cf5dbeed5",
    "images_012.tar.gz": "dc9fda1757c2de0032b63347a7d2895c",
}
ARCHIVE_GLOBS = ("*.tar.gz", "*.tgz")


class SourceError(ValueError):
    """An image source that cannot be read as intended (e.g. an archive whose MD5 differs)."""


@dataclass(frozen=True)
class ImageItem:
    """One image found in the source. Loose files carry a path; archive members their bytes."""

    name: str  # file name, e.g. 00000001_000.png (the metadata's Image Index)
    location: str  # relative path, or 'archive.tar.gz:member/path.png'
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return Path(self.path).read_bytes()


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it (one pass, no re-read)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.md5 = raw, hashlib.md5(usedforsecurity=False)

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.md5.update(chunk)
        return chunk

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def find_archives(root: Path) -> list[Path]:
    return sorted({p for pattern in ARCHIVE_GLOBS for p in root.glob(pattern)})


def find_loose_pngs(root: Path) -> list[Path]:
    """Every *.png under root (images/, or NIH's images_0NN/images/ after extraction)."""
    return sorted(p for p in root.rglob("*.png") if p.is_file())


def iter_archive(archive: Path, verify_md5: bool = True, wanted: set[str] | None = None):
    """Stream PNG members of a .tar.gz without extracting; check NIH's MD5 when the name matches.

    `wanted` limits which members are read into memory (others are skipped while streaming).
    """
    expected = NIH_ARCHIVE_MD5.get(archive.name) if verify_md5 else None
    with archive.open("rb") as fh:
        reader = _HashingReader(fh)
        try:
            with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if not member.isfile() or not name.lower().endswith(".png"):
                        continue
                    if wanted is not None and name not in wanted:
                        continue
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted else b""
                    yield ImageItem(name, f"{archive.name}:{member.name}", data=data)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{archive}: cannot read archive ({exc}); re-download it") from exc
        reader.drain()
    if expected and reader.md5.hexdigest() != expected:
        raise SourceError(
            f"{archive}: MD5 {reader.md5.hexdigest()} does not match NIH's published "
            f"{expected}; the download is incomplete or altered. Re-download it."
        )


def iter_images(root: Path, verify_md5: bool = True, wanted: set[str] | None = None):
    """All images under root: loose PNGs (sorted), then each archive's members in order."""
    for path in find_loose_pngs(root):
        if wanted is None or path.name in wanted:
            yield ImageItem(path.name, str(path.relative_to(root)), path=str(path))
    for archive in find_archives(root):
        yield from iter_archive(archive, verify_md5, wanted)


def count_images(root: Path) -> int | None:
    """Number of loose PNGs (archives cannot be counted without reading them: None then)."""
    return None if find_archives(root) else len(find_loose_pngs(root))


ImageIterator = Iterator[ImageItem]


SYNTHETIC_DIR = Path("data/raw/synthetic")


def source_root(source: str, nih_dir: str) -> Path:
    """The folder ingest and resize read: the embedded default, or data.nih_dir."""
    return SYNTHETIC_DIR if source == "synthetic" else Path(nih_dir)
