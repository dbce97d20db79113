"""Builds small NIH ChestX-ray14-format folders (metadata CSV + PNGs, optional tar.gz) for tests."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from fedcxr.labels import FINDINGS

HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
HEADER_V2020 = HEADER_2017[:-1]
METADATA_NAMES = {"2017": "Data_Entry_2017.csv", "v2020": "Data_Entry_2017_v2020.csv"}
LAYOUTS = {"2017": "nih-2017", "v2020": "nih-v2020"}
# Patient IDs far from small numbers, so a leak of a raw ID into an output is unmistakable.
FIRST_PATIENT_ID = 23417
PATIENT_ID_STEP = 1093
PHI_NAME = "Jane Doe"
PHI_COMMENT = "Patient: DOE^JANE"
EXTRA_COLUMN = "Patient Name"
SECRET_ENV = "FEDCXR_DEID_SECRET"
# A strong key as `openssl rand -hex 32` makes one (test only; real keys stay outside git).
TEST_SECRET = "660b1bd617238ac7903ca1a7e861e5945d54fb64f2b74a5657e1d6f33f02f05d"


def image_name(pid: int, k: int) -> str:
    return f"{pid:08d}_{k:03d}.png"


def png_bytes(image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def gray_png(rng: np.random.Generator, size: int, pnginfo=None) -> bytes:
    pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels), pnginfo)


def rgba_png(rng: np.random.Generator, size: int) -> bytes:
    rgb = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size, 1), 255, dtype=np.uint8)
    return png_bytes(Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"))


def gray16_png(rng: np.random.Generator, size: int) -> bytes:
    pixels = rng.integers(1000, 60000, size=(size, size), dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    return png_bytes(image)


def text_info(*pairs: tuple[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in pairs:
        info.add_text(key, value)
    return info


def png_chunk(ctype: str, data: bytes) -> bytes:
    """One PNG chunk as stored: length, type, data, CRC."""
    tag = ctype.encode("latin-1")
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def text_chunk(keyword: str, text: str) -> bytes:
    return png_chunk("tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def ztxt_chunk(keyword: str, text: str) -> bytes:
    body = keyword.encode("latin-1") + b"\0\0" + zlib.compress(text.encode("latin-1"))
    return png_chunk("zTXt", body)


def itxt_chunk(keyword: str, text: str, compressed: bool = False) -> bytes:
    data = text.encode("utf-8")
    head = keyword.encode("latin-1") + b"\0" + bytes([int(compressed), 0]) + b"en\0\0"
    return png_chunk("iTXt", head + (zlib.compress(data) if compressed else data))


def exif_chunk(**tags: str) -> bytes:
    """An eXIf chunk holding real EXIF (TIFF) data; tags by name, e.g. Artist='…'."""
    exif = Image.Exif()
    ids = {"ImageDescription": 0x010E, "Artist": 0x013B, "Copyright": 0x8298}
    for name, value in tags.items():
        exif[ids[name]] = value
    return png_chunk("eXIf", exif.tobytes()[6:])  # without the 'Exif\0\0' JPEG header


def with_chunks(png: bytes, chunks: Sequence[bytes]) -> bytes:
    """The PNG with raw chunks inserted right after IHDR (before any image data)."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _labels(rng: np.random.Generator) -> str:
    roll = rng.random()
    if roll < 0.4:
        return "No Finding"
    count = 1 if roll < 0.8 else 2
    picked = rng.choice(len(FINDINGS), size=count, replace=False)
    return "|".join(FINDINGS[i] for i in sorted(picked))


def make_nih_folder(
    root: Path,
    n_patients: int = 6,
    images_per_patient: int = 2,
    layout: str = "2017",
    size: int = 64,
    seed: int = 0,
    *,
    rgba: bool = False,
    gray16: bool = False,
    truncated: bool = False,
    phi_text: bool = False,
    harmless_text: bool = False,
    missing_image: bool = False,
    orphan_image: bool = False,
    archive: str | None = None,
    archive_count: int = 3,
    extra_column: bool = False,
    ages: dict[int, str] | None = None,
    chunks: dict[int, Sequence[bytes]] | None = None,
    file_names: dict[int, str] | None = None,
    extra_values: dict[int, str] | None = None,
) -> dict:
    """Write root/Data_Entry_2017[_v2020].csv and root/images/*.png; return what was built.

    Special cases are placed on fixed rows (RGBA on row 0, 16-bit on row 1, truncated on
    row 2, patient-name tEXt on row 3, harmless tEXt on row 4; the missing image is the last
    row; the archive holds the `archive_count` rows before it). `ages` maps row numbers to
    raw 'Patient Age' strings, `chunks` to raw PNG chunks (png_chunk & co.) inserted into that
    row's image, `file_names` to file names used instead of NIH's, `extra_values` to values of the
    extra column. The returned dict names every file so tests can assert on it.
    """
    if layout not in METADATA_NAMES:
        raise ValueError(f"layout must be one of {sorted(METADATA_NAMES)}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    for p in range(n_patients):
        pid = FIRST_PATIENT_ID + p * PATIENT_ID_STEP
        for k in range(images_per_patient):
            rows.append(
                {
                    "Image Index": image_name(pid, k),
                    "Finding Labels": _labels(rng),
                    "Follow-up #": str(k),
                    "Patient ID": str(pid),
                    "Patient Age": str(int(rng.integers(20, 80))),
                    "Patient Gender": "M" if rng.random() < 0.5 else "F",
                    "View Position": "PA" if rng.random() < 0.6 else "AP",
                    "width": str(size),
                    "height": str(size),
                    "spacing_x": "0.143",
                    "spacing_y": "0.143",
                    EXTRA_COLUMN: f"Person {p}",
                }
            )
    for i, raw_age in (ages or {}).items():
        rows[i]["Patient Age"] = raw_age
    for i, name in (file_names or {}).items():
        rows[i]["Image Index"] = name
    for i, value in (extra_values or {}).items():
        rows[i][EXTRA_COLUMN] = value
    names = [r["Image Index"] for r in rows]

    built: dict = {
        "root": root,
        "layout": LAYOUTS[layout],
        "rows": names,
        "patient_ids": sorted({r["Patient ID"] for r in rows}),
        "ages": {r["Image Index"]: r["Patient Age"] for r in rows},
        "files": {},  # name -> PNG bytes as encoded (the truncated file: before the cut)
        "modes": {},  # name -> PIL mode of the file
    }

    special: dict[int, tuple[str, bytes, str]] = {}
    if rgba:
        special[0] = ("rgba", rgba_png(rng, size), "RGBA")
    if gray16:
        special[1] = ("gray16", gray16_png(rng, size), "I;16")
    if truncated:
        special[2] = ("truncated", gray_png(rng, size), "L")
    if phi_text:
        info = text_info(("Author", PHI_NAME), ("Comment", PHI_COMMENT))
        special[3] = ("phi_text", gray_png(rng, size, info), "L")
    if harmless_text:
        info = text_info(("Software", "fedcxr-test"))
        special[4] = ("harmless_text", gray_png(rng, size, info), "L")
    for i, (key, data, mode) in special.items():
        built[key] = names[i]
        built["files"][names[i]] = data
        built["modes"][names[i]] = mode
    for name in names:
        if name not in built["files"]:
            built["files"][name] = gray_png(rng, size)
            built["modes"][name] = "L"
    for i, raw_chunks in (chunks or {}).items():
        built["files"][names[i]] = with_chunks(built["files"][names[i]], raw_chunks)

    with_files = list(names)
    if missing_image:
        built["missing"] = names[-1]
        with_files.remove(names[-1])
        del built["files"][names[-1]]
        del built["modes"][names[-1]]
    if orphan_image:
        orphan = image_name(FIRST_PATIENT_ID + n_patients * PATIENT_ID_STEP, 0)
        built["orphan"] = orphan
        built["files"][orphan] = gray_png(rng, size)
        built["modes"][orphan] = "L"
        with_files.append(orphan)

    stored = dict(built["files"])
    if truncated:
        name = built["truncated"]
        stored[name] = stored[name][: len(stored[name]) // 2]

    archived: list[str] = []
    if archive:
        candidates = [n for n in names if n in with_files]
        archived = candidates[-archive_count:]
        archive_path = root / archive
        with tarfile.open(archive_path, "w:gz") as tar:
            for name in archived:
                data = stored[name]
                member = tarfile.TarInfo(f"images/{name}")
                member.size = len(data)
                member.mtime = 1_500_000_000
                tar.addfile(member, io.BytesIO(data))
        built["archive"] = archive_path
    built["archived"] = archived
    built["loose"] = [n for n in with_files if n not in archived]

    for name in built["loose"]:
        (images_dir / name).write_bytes(stored[name])

    header = HEADER_2017 if layout == "2017" else HEADER_V2020
    fields = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
        "width",
        "height",
        "spacing_x",
        "spacing_y",
    ]
    if extra_column:
        trailing = header.endswith(",")
        header = header.rstrip(",") + f",{EXTRA_COLUMN}" + ("," if trailing else "")
        fields.append(EXTRA_COLUMN)
        built["extra_column"] = EXTRA_COLUMN
        built["extra_values"] = sorted({r[EXTRA_COLUMN] for r in rows})
    end = "," if layout == "2017" else ""
    lines = [header] + [",".join(r[f] for f in fields) + end for r in rows]
    metadata_path = root / METADATA_NAMES[layout]
    metadata_path.write_text("\n".join(lines) + "\n")
    built["metadata_path"] = metadata_path
    return built


def listing(root: Path) -> dict[str, int]:
    """Every file under root with its size (to check that nothing was written there)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
