"""PNG chunk scanning and 8-bit grayscale conversion (fedcxr.imaging)."""

from __future__ import annotations

import numpy as np
import pytest
from nihfolder import png_bytes
from PIL import Image, PngImagePlugin

from fedcxr.imaging import PngChunk, needs_conversion, open_image, scan_chunks, to_gray8


def _png_with_chunks() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")
    info.add_text("Comment", "Patient: DOE^JANE", zip=True)  # zTXt
    info.add_itxt("Title", "Thorax é", lang="en", tkey="Titel", zip=False)
    info.add_itxt("Description", "compressed international text", zip=True)
    info.add(b"tIME", bytes([0x07, 0xE3, 3, 4, 5, 6, 7]))  # 2019-03-04 05:06:07
    pixels = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    return png_bytes(Image.fromarray(pixels), info)


def test_scan_chunks_finds_text_chunks_with_keyword_and_decoded_text():
    scan = scan_chunks(_png_with_chunks())
    assert scan.is_png
    assert scan.complete
    found = set(scan.chunks)
    assert PngChunk("tEXt", "Author", "Jane Doe") in found
    assert PngChunk("zTXt", "Comment", "Patient: DOE^JANE") in found
    assert PngChunk("iTXt", "Title", "Thorax é") in found
    assert PngChunk("iTXt", "Description", "compressed international text") in found
    assert PngChunk("tIME", "", "2019-03-04 05:06:07") in found
    assert len(scan.chunks) == 5


def test_scan_chunks_plain_png_has_no_metadata_chunks():
    scan = scan_chunks(png_bytes(Image.new("L", (8, 8), 7)))
    assert scan == scan.__class__((), is_png=True, complete=True)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_scan_chunks_reports_truncated_png_as_incomplete(keep):
    data = _png_with_chunks()
    scan = scan_chunks(data[: int(len(data) * keep)])
    assert scan.is_png
    assert not scan.complete


def test_scan_chunks_png_cut_just_before_iend_is_incomplete():
    data = png_bytes(Image.new("L", (8, 8), 7))
    assert data.endswith(b"IEND\xaeB`\x82")
    assert scan_chunks(data[:-12]).complete is False
    assert scan_chunks(data[:-1]).complete is False
    assert scan_chunks(data).complete is True


@pytest.mark.parametrize(
    "data", [b"", b"GIF89a" + bytes(40), b"\xff\xd8\xff\xe0 jpeg", b"\x89PNG\r\n"]
)
def test_scan_chunks_non_png_bytes(data):
    scan = scan_chunks(data)
    assert scan.is_png is False
    assert scan.complete is False
    assert scan.chunks == ()


def test_open_image_raises_on_truncated_png():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = png_bytes(Image.fromarray(pixels))
    with pytest.raises((OSError, ValueError, SyntaxError)):
        open_image(data[: len(data) // 2])


def test_to_gray8_rgba_gives_luma_of_rgb():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (32, 48, 1), dtype=np.uint8)  # alpha must be ignored
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA")
    gray = to_gray8(open_image(png_bytes(rgba)))
    assert gray.dtype == np.uint8
    assert gray.shape == (32, 48)
    # ITU-R 601-2 luma, what PIL's convert("L") computes on RGB.
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray.astype(int) - np.rint(luma).astype(int)).max() <= 1
    assert np.array_equal(gray, np.asarray(Image.fromarray(rgb, mode="RGB").convert("L")))


def test_to_gray8_rgb_and_alpha_255_match():
    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    opaque = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(
        to_gray8(Image.fromarray(rgb, mode="RGB")),
        to_gray8(Image.fromarray(opaque, mode="RGBA")),
    )


def test_to_gray8_16bit_is_stretched_to_full_range():
    pixels = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    image = open_image(png_bytes(Image.fromarray(pixels)))
    assert image.mode == "I;16"
    gray = to_gray8(image)
    assert gray.dtype == np.uint8
    expected = np.rint((pixels - 1000) * 255.0 / 4000).astype(np.uint8)
    assert np.array_equal(gray, expected)
    assert gray.min() == 0
    assert gray.max() == 255


def test_to_gray8_16bit_random_is_min_max_stretched():
    pixels = np.random.default_rng(4).integers(300, 64000, (40, 40), dtype=np.uint16)
    gray = to_gray8(open_image(png_bytes(Image.fromarray(pixels))))
    lo, hi = int(pixels.min()), int(pixels.max())
    expected = np.rint((pixels.astype(np.float64) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    assert np.array_equal(gray, expected)


def test_to_gray8_constant_16bit_image_is_zero():
    image = Image.fromarray(np.full((4, 4), 4242, dtype=np.uint16))
    gray = to_gray8(image)
    assert gray.dtype == np.uint8
    assert not gray.any()


def test_to_gray8_l_passes_through_unchanged():
    pixels = np.random.default_rng(5).integers(0, 256, (20, 30), dtype=np.uint8)
    gray = to_gray8(open_image(png_bytes(Image.fromarray(pixels))))
    assert gray.dtype == np.uint8
    assert np.array_equal(gray, pixels)


def test_needs_conversion_only_for_non_l_modes():
    assert not needs_conversion("L")
    assert all(needs_conversion(m) for m in ("RGB", "RGBA", "I;16", "LA", "P", "I"))
