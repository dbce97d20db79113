"""A fast 8-bit grayscale PNG writer whose bytes depend on nothing but the pixels.

PIL hands PNG compression to the system's zlib, whose output is not specified: zlib 1.2, 1.3
and zlib-ng (Fedora's libz, Pillow's own wheels) emit different deflate streams for the same
pixels, so the files' hashes, and every DVC output downstream, depended on the machine. It is
also slow here: adaptive row filters plus LZ77 cost about as much as rendering the image.

This writer needs neither. Rows use PNG's Average filter (the best single filter for these
noisy radiographs), and the filtered bytes go into one deflate block of literals coded with a
length-limited Huffman code built from their histogram (what zlib calls Z_HUFFMAN_ONLY): the
noise leaves LZ77 almost nothing to find. Everything is integer arithmetic in NumPy and plain
Python, so the same pixels give the same bytes on every machine; CRC-32 and Adler-32 are fixed
functions, taken from Python's zlib. The files are ordinary PNGs that any decoder reads.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_gray_png", "huffman_lengths"]

_SIG = b"\x89PNG\r\n\x1a\n"
_EOB = 256  # deflate's end-of-block symbol
_MAX_BITS = 15  # deflate's longest literal/length code
_CHUNK = 1 << 15  # pairs of literals packed at a time (their arrays stay in cache)
# The order in which deflate sends the code-length code's lengths (RFC 1951, 3.2.7).
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


def huffman_lengths(counts: list[int] | np.ndarray, max_bits: int) -> list[int]:
    """Optimal code lengths (0 for unused symbols) no longer than max_bits, by package-merge.

    At least two symbols always get a code (an unused one is added if needed), so the code is
    complete, as zlib's inflate requires. Ties break by symbol, so the result is deterministic.
    """
    counts = [int(c) for c in counts]
    used = [i for i, c in enumerate(counts) if c > 0]
    for filler in range(len(counts)):
        if len(used) >= 2:
            break
        if filler not in used:
            used = sorted([*used, filler])
    if len(used) < 2 or len(used) > (1 << max_bits):
        raise ValueError(f"expected 2..{1 << max_bits} symbols to code, found {len(used)}")
    leaves = sorted((max(counts[i], 1), (i,)) for i in used)
    lengths = [0] * len(counts)
    packages: list[tuple[int, tuple[int, ...]]] = []
    for _ in range(max_bits - 1):
        merged = sorted(leaves + packages)
        packages = [
            (merged[k][0] + merged[k + 1][0], merged[k][1] + merged[k + 1][1])
            for k in range(0, len(merged) - 1, 2)
        ]
    # The 2n - 2 cheapest items of the final list: each leaf occurrence adds one bit.
    for _, symbols in sorted(leaves + packages)[: 2 * len(used) - 2]:
        for s in symbols:
            lengths[s] += 1
    return lengths


def _canonical_codes(lengths: list[int]) -> list[int]:
    """Deflate's canonical codes for the lengths, bit-reversed (deflate sends them MSB first)."""
    max_len = max(lengths)
    bl_count = [0] * (max_len + 1)
    for n in lengths:
        if n:
            bl_count[n] += 1
    code, next_code = 0, [0] * (max_len + 2)
    for bits in range(1, max_len + 1):
        code = (code + bl_count[bits - 1]) << 1
        next_code[bits] = code
    out = []
    for n in lengths:
        if n:
            c = next_code[n]
            next_code[n] += 1
            out.append(int(f"{c:0{n}b}"[::-1], 2))
        else:
            out.append(0)
    return out


class _Bits:
    """LSB-first bit writer for the (short) block header."""

    def __init__(self) -> None:
        self.acc = 0
        self.n = 0

    def put(self, value: int, bits: int) -> None:
        self.acc |= (value & ((1 << bits) - 1)) << self.n
        self.n += bits


def _block_header(lengths: list[int]) -> _Bits:
    """BFINAL, BTYPE=2 and the code lengths of a dynamic block with no distance codes in use."""
    hlit = 257
    dist_lengths = [1, 1]  # two unused distance codes keep the distance code complete
    seq = lengths[:hlit] + dist_lengths
    cl_lengths = huffman_lengths(np.bincount(seq, minlength=19), 7)
    cl_codes = _canonical_codes(cl_lengths)
    hclen = 19
    while hclen > 4 and cl_lengths[_CL_ORDER[hclen - 1]] == 0:
        hclen -= 1
    bits = _Bits()
    bits.put(1, 1)  # BFINAL
    bits.put(2, 2)  # dynamic Huffman codes
    bits.put(hlit - 257, 5)
    bits.put(len(dist_lengths) - 1, 5)
    bits.put(hclen - 4, 4)
    for sym in _CL_ORDER[:hclen]:
        bits.put(cl_lengths[sym], 3)
    for n in seq:
        bits.put(cl_codes[n], cl_lengths[n])
    return bits


def _avg_filter(pixels: np.ndarray) -> np.ndarray:
    """PNG filter type 3 (Average) applied to every row, filter-type byte first."""
    h, w = pixels.shape
    left = np.zeros((h, w), np.uint8)
    left[:, 1:] = pixels[:, :-1]
    up = np.zeros((h, w), np.uint8)
    up[1:] = pixels[:-1]
    # floor((left + up) / 2) without leaving uint8: (a & b) + ((a ^ b) >> 1).
    pred = left & up
    left ^= up
    left >>= 1
    pred += left
    out = np.empty((h, w + 1), np.uint8)
    out[:, 0] = 3
    np.subtract(pixels, pred, out=out[:, 1:])  # modulo 256, as PNG specifies
    return out


def _pack_pairs(
    pairs: np.ndarray, pair_len: np.ndarray, pair_code: np.ndarray, at: int, words: np.ndarray
) -> int:
    """OR the codes of `pairs` into `words` from bit `at` on; returns the bit after them."""
    base = at // 32
    idx = pairs.astype(np.intp)
    plen = pair_len[idx]
    start = np.cumsum(plen, dtype=np.uint32)
    end = at + int(start[-1])
    start -= plen
    start += np.uint32(at - 32 * base)
    # Each 32-bit word gets the pairs that start in it, in 64 bits (a pair that starts late in
    # its word spills into the next). Every word holds a start (pairs are <= 30 bits), so a
    # running sum (the pairs' bits never overlap) read at each word's last pair gives it.
    word = start >> np.uint32(5)
    start &= np.uint32(31)
    val = pair_code[idx]
    val <<= start.astype(np.uint64)
    run = np.cumsum(val)
    last = np.flatnonzero(word[1:] != word[:-1])
    ends = np.empty(last.size + 2, np.uint64)
    ends[0] = 0
    ends[1:-1] = run[last]
    ends[-1] = run[-1]
    wide = ends[1:] - ends[:-1]
    span = words[base : base + wide.size + 1]
    span[:-1] |= wide & np.uint64(0xFFFFFFFF)
    span[1:] |= wide >> np.uint64(32)
    return end


def _or_bits(words: np.ndarray, at: int, value: int, bits: int) -> None:
    """OR the `bits`-bit integer `value` into the 32-bit words (held in uint64) at bit `at`."""
    first = at // 32
    value <<= at - 32 * first
    for k in range(first, (at + bits + 31) // 32):
        words[k] |= np.uint64(value & 0xFFFFFFFF)
        value >>= 32


def _deflate_literals(data: np.ndarray) -> bytes:
    """`data` (1-D uint8) as one final dynamic-Huffman deflate block of literals."""
    odd = data.size % 2
    pairs = data[: data.size - odd].view("<u2")  # first | second << 8
    by_pair = np.bincount(pairs, minlength=1 << 16).reshape(256, 256)  # [second, first]
    counts = by_pair.sum(axis=0) + by_pair.sum(axis=1)
    if odd:
        counts[data[-1]] += 1
    counts = [*counts.tolist(), 1]  # + end of block
    lengths = huffman_lengths(counts, _MAX_BITS)
    codes = _canonical_codes(lengths)
    header = _block_header(lengths)
    # Literals are coded two at a time: a pair's code has at most 30 bits.
    lens = np.asarray(lengths[:256], np.uint32)  # chunks of pairs: < 2**32 bits
    cods = np.asarray(codes[:256], np.uint64)
    pair_len = (lens[None, :] + lens[:, None]).reshape(-1)  # [second, first]
    pair_code = (cods[None, :] | (cods[:, None] << lens[None, :].astype(np.uint64))).reshape(-1)
    end = header.n + sum(c * n for c, n in zip(counts[:256], lengths[:256], strict=True))
    end -= lengths[int(data[-1])] if odd else 0
    words = np.zeros(end // 32 + 4, np.uint64)  # 32-bit words, held in 64 bits
    at = header.n
    for c0 in range(0, pairs.size, _CHUNK):
        at = _pack_pairs(pairs[c0 : c0 + _CHUNK], pair_len, pair_code, at, words)
    if at != end:  # pragma: no cover - an internal invariant
        raise AssertionError(f"packed {at} bits, expected {end}")
    # The header's bits first; after the pairs, an odd last literal and the end-of-block code.
    tail, tail_len = codes[_EOB], lengths[_EOB]
    if odd:
        last = int(data[-1])
        tail = codes[last] | tail << lengths[last]
        tail_len += lengths[last]
    total = end + tail_len
    _or_bits(words, 0, header.acc, header.n)
    _or_bits(words, end, tail, tail_len)
    return words.astype("<u4").tobytes()[: (total + 7) // 8]


def _chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data."""
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def encode_gray_png(pixels: np.ndarray) -> bytes:
    """The PNG file for a 2-D uint8 array (8-bit grayscale, no interlace)."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, found {pixels.ndim}-D {pixels.dtype}")
    h, w = pixels.shape
    if h < 1 or w < 1:
        raise ValueError(f"expected a non-empty image, found shape {pixels.shape}")
    raw = _avg_filter(np.ascontiguousarray(pixels)).reshape(-1)
    stream = b"\x78\x01" + _deflate_literals(raw) + struct.pack(">I", zlib.adler32(raw))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return _SIG + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
