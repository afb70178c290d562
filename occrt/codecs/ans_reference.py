"""A plain reference decoder for ans blocks, written from `format_spec/ans.md` alone.

It imports nothing from `occrt.codecs.ans` and does not call constriction: the tests decode what constriction
encoded with it, which shows the spec says everything a decoder needs. Python integers throughout (about a
microsecond a symbol): meant for tests and for reading the algorithm, not for speed. It checks the MUST-reject rules
that decoding itself runs into; `occrt.codecs.ans.decode_symbols` checks all of them.
"""
from __future__ import annotations

import bisect
import struct

import numpy as np

from occrt.errors import FormatError


def _varints(data: bytes, pos: int, count: int, max_len: int) -> tuple[list[int], int]:
    """`count` LEB128 varints from data[pos:]: (values, position after them)."""
    values = []
    for _ in range(count):
        value = shift = 0
        for length in range(1, max_len + 1):
            if pos >= len(data):
                raise FormatError("varint runs past its section", pos)
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                if byte == 0 and length > 1:
                    raise FormatError("overlong varint", pos - 1)
                break
        else:
            raise FormatError(f"varint longer than {max_len} bytes", pos - 1)
        values.append(value)
    return values, pos


def reference_decode_symbols(block: bytes | memoryview) -> np.ndarray:
    data = bytes(block)
    if len(data) < 40:
        raise FormatError("block shorter than its header", len(data))
    magic, version, coder, p, flags, n, chunk_size, n_chunks, lo, n_range, table_bytes, _ = struct.unpack_from(
        "<4sBBBBQIIiIII", data, 0)
    if (magic, version, coder, p) != (b"oANS", 1, 1, 24) or flags > 1:
        raise FormatError("not an ans v1 block with coder 1 at precision 24", 0)
    if not 1 <= chunk_size <= 1 << 24 or n_chunks != -(-n // chunk_size) or n > 1 << 32:
        raise FormatError("bad symbol or chunk counts", 8)
    m = n_range + (flags & 1)
    freqs, end = _varints(data[:40 + table_bytes], 40, m, 4)
    freqs = [f + 1 for f in freqs]
    if end != 40 + table_bytes or (m and sum(freqs) != 1 << p):
        raise FormatError("frequency table does not hold M entries summing to 2^P", 40)
    cdf = [0]
    for f in freqs:
        cdf.append(cdf[-1] + f)
    index_offset = (40 + table_bytes + 7) // 8 * 8
    out = []
    for j in range(n_chunks):
        if index_offset + 32 * (j + 1) > len(data):
            raise FormatError("chunk index runs past the block", index_offset + 32 * j)
        words_offset, escape_offset, n_words, escape_bytes, count, n_escapes = struct.unpack_from(
            "<QQIIII", data, index_offset + 32 * j)
        if words_offset + 4 * n_words > len(data) or escape_offset + escape_bytes > len(data):
            raise FormatError(f"chunk {j} points past the block", index_offset + 32 * j)
        words = struct.unpack_from(f"<{n_words}I", data, words_offset)
        escapes, esc_end = _varints(data[:escape_offset + escape_bytes], escape_offset, n_escapes, 5)
        if esc_end != escape_offset + escape_bytes:
            raise FormatError(f"chunk {j}: escape bytes do not hold n_escapes values", escape_offset)
        escapes = [(u >> 1) ^ -(u & 1) for u in escapes]  # zigzag
        # rANS decoding, section 5 of the spec: words are popped from the end of the chunk's list.
        if n_words and words[-1] == 0:
            raise FormatError(f"chunk {j}: last word is zero", words_offset + 4 * n_words - 4)
        pos, x = n_words, 0
        for _ in range(min(2, n_words)):  # the initial state: the last word, then the one before it
            pos -= 1
            x = (x << 32) | words[pos]
        mask, e = (1 << p) - 1, 0
        for _ in range(count):
            q = x & mask
            s = bisect.bisect_right(cdf, q) - 1  # cdf[s] <= q < cdf[s + 1]
            x = (x >> p) * (cdf[s + 1] - cdf[s]) + q - cdf[s]
            if x < 1 << 32 and pos > 0:
                pos -= 1
                x = (x << 32) | words[pos]
            if s < n_range:
                out.append(lo + s)
            elif e < len(escapes):
                out.append(escapes[e])
                e += 1
            else:
                raise FormatError(f"chunk {j}: more escapes decoded than stored", escape_offset)
        if x != 0 or pos != 0 or e != len(escapes):
            raise FormatError(f"chunk {j}: stream does not end in the initial state", words_offset)
    if len(out) != n:
        raise FormatError("chunk symbol counts do not add up to n_symbols", 8)
    return np.array(out, dtype=np.int32)
