"""The constants of the `.occ` container, version 1: the one place they are written down in code.

Every value here is also in `format_spec/occ.md`; `tests/test_format_spec.py` checks that the two agree.
"""
from __future__ import annotations

import numpy as np

# 8 bytes. The high byte and the CR LF / ^Z / LF tail catch 7-bit channels and text-mode newline translation (as PNG's).
MAGIC = b"\x89OCC\r\n\x1a\n"
VERSION_MAJOR = 1
VERSION_MINOR = 0

# Prelude: magic (8) | u16 major | u16 minor | u32 header_crc32 | u64 header_length, all little-endian.
PRELUDE_FORMAT = "<8sHHIQ"
PRELUDE_SIZE = 24
# The header CRC covers the prelude without its own CRC field, then the header bytes, so a flipped bit anywhere
# before the data area is detected.
HEADER_CRC_SPANS = ((0, 12), (16, 24))

ALIGNMENT = 64  # every data section starts at a multiple of this, relative to the data area

# Limits a reader enforces before it allocates anything (format_spec/occ.md, "Limits").
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 1 << 20
MAX_BLOBS = 1 << 10
MAX_NAME_BYTES = 512
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 40
MAX_JSON_DEPTH = 32
# JSON numbers: an integer literal has at most 20 digits and lies in [-2^63, 2^64) (every integer field fits 64 bits,
# and parsing stays linear whatever Python's int-digit limit is set to); a number literal must be finite (1e400 is not).
MAX_JSON_INT_DIGITS = 20
JSON_INT_RANGE = (-(1 << 63), (1 << 64) - 1)
# A tensor decodes to at most this many elements per byte of its section (at least 1/512 bit per element): so no
# index entry can make a reader allocate more than 16 KiB (float32) per byte the file really holds. Raw needs <= 1;
# an entropy-coded block of 2^16-symbol chunks spends >= 32 index bytes per chunk, so <= 2048.
MAX_ELEMENTS_PER_BYTE = 4096

# Logical dtypes of decoded tensors: name -> (bytes per element, numpy dtype a raw section is read as).
# bf16 has no numpy dtype: its raw bits are read as '<u2' and widened to float32 exactly.
DTYPES: dict[str, tuple[int, str]] = {
    "f32": (4, "<f4"),
    "f16": (2, "<f2"),
    "bf16": (2, "<u2"),
}

HEADER_KEYS = frozenset({"metadata", "blobs", "tensors", "data_length"})
BLOB_KEYS = frozenset({"name", "offset", "length", "crc32"})
TENSOR_KEYS = frozenset({"name", "dtype", "shape", "codec", "codec_version", "params", "offset", "length", "crc32"})


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns ('<u2') to float32 exactly: bf16 is the top half of an IEEE float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns, round-to-nearest-even (NaN kept as a quiet NaN)."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = np.isnan(w)
    if nan.any():
        rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)
