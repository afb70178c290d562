"""Codec 2, `planes`: lossless. A float tensor's bit fields split into streams, each entropy-coded with ANS.

Floating-point fields have very different statistics: the exponents of trained weights take a handful of values
(2-3 bits of entropy), while sign and mantissa bits are nearly uniform. Coding them as separate streams lets the
exponent stream shrink to its entropy; the others cost about what they hold. Decoded values are bit-identical.

Streams per dtype (bits is the element's IEEE bit pattern, little-endian u16 or u32):

    bf16: exponent = (bits >> 7) & 0xFF;   sign_mantissa = (bits >> 15) << 7 | bits & 0x7F
    f16:  exponent = (bits >> 10) & 0x1F;  sign_mantissa = (bits >> 15) << 10 | bits & 0x3FF
    f32:  exponent = (bits >> 23) & 0xFF;  sign_mantissa = (bits >> 31) << 7 | (bits >> 16) & 0x7F;
          mantissa_mid = (bits >> 8) & 0xFF;  mantissa_low = bits & 0xFF

Payload: u64 byte length of each stream's ANS block (format_spec/ans.md), in the order above, then the blocks, each
starting at a multiple of 8 bytes. `params` is {}.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Iterator

import numpy as np

from occrt.codecs import ans
from occrt.codecs.base import Codec, Encoded, n_elements
from occrt.errors import FormatError
from occrt.format.constants import bf16_bits_to_f32, f32_to_bf16_bits

STREAMS = {"bf16": 2, "f16": 2, "f32": 4}


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def split(bits: np.ndarray, dtype: str) -> list[np.ndarray]:
    """The streams of `bits` (u16 for bf16/f16, u32 for f32), as int32 symbols."""
    return list(iter_streams(bits, dtype))


def iter_streams(bits: np.ndarray, dtype: str) -> Iterator[np.ndarray]:
    """`split`'s streams one at a time, each computed when asked for: an encoder that codes each before asking for
    the next holds one stream (the tensor's size in int32) at a time, not all of them."""
    b = bits.reshape(-1)
    if dtype == "bf16":
        yield _field(b, 7, 0xFF)
        yield _or(_field(b, 15, 0x1, 7), _field(b, 0, 0x7F))
    elif dtype == "f16":
        yield _field(b, 10, 0x1F)
        yield _or(_field(b, 15, 0x1, 10), _field(b, 0, 0x3FF))
    else:
        yield _field(b, 23, 0xFF)
        yield _or(_field(b, 31, 0x1, 7), _field(b, 16, 0x7F))
        yield _field(b, 8, 0xFF)
        yield _field(b, 0, 0xFF)


def _or(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a |= b  # in place: no third array
    return a


def _field(b: np.ndarray, shift: int, mask: int, up: int = 0) -> np.ndarray:
    """((b >> shift) & mask) << up as int32 (every stream is below 2^16), in one new array of b's length."""
    if b.dtype == np.uint32:
        x = (b >> shift).view(np.int32)  # the logical shift happens in uint32; the mask then clears the sign
    else:
        x = b.astype(np.int32)  # from uint16: non-negative, so int32's arithmetic shift is the logical one
        x >>= shift
    x &= mask
    x <<= up
    return x


def join(streams: list[np.ndarray], dtype: str) -> np.ndarray:
    """Inverse of `split`: the bit patterns (u16 or u32)."""
    s = [x.astype(np.uint32) for x in streams]
    if dtype == "bf16":
        return (((s[1] >> 7) << 15) | (s[0] << 7) | (s[1] & 0x7F)).astype(np.uint16)
    if dtype == "f16":
        return (((s[1] >> 10) << 15) | (s[0] << 10) | (s[1] & 0x3FF)).astype(np.uint16)
    return ((s[1] >> 7) << 31) | (s[0] << 23) | ((s[1] & 0x7F) << 16) | (s[2] << 8) | s[3]


def bit_patterns(w: np.ndarray, dtype: str) -> np.ndarray:
    """`w`'s IEEE bit patterns in `dtype` (u16 for bf16/f16, u32 for f32); bf16 may be given as '<u2' bits."""
    if dtype == "bf16":
        return w if w.dtype == np.uint16 else f32_to_bf16_bits(np.asarray(w, dtype=np.float32))
    if dtype == "f16":
        return np.ascontiguousarray(w, dtype=np.float16).view(np.uint16)
    return np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)


def _head_bytes(n_streams: int) -> int:
    return _align8(struct.calcsize(f"<{n_streams}Q"))


def estimate_payload_bytes(w: np.ndarray, *, dtype: str = "f32", chunk_size: int = ans.DEFAULT_CHUNK_SIZE) -> float:
    """The size `PlanesCodec.encode` would give, without coding: the head, then each stream's block as
    ans.estimate_bits has it (within ~0.5 %), padded to 8 bytes but the last."""
    total = float(_head_bytes(STREAMS[dtype]))
    sizes = []
    for symbols in iter_streams(bit_patterns(w, dtype), dtype):
        sizes.append(ans.estimate_bits(symbols, chunk_size=chunk_size) / 8)
        del symbols
    return total + sum(b if i + 1 == len(sizes) else _align8(math.ceil(b)) for i, b in enumerate(sizes))


class PlanesCodec(Codec):
    id = 2
    name = "planes"
    versions = (1,)

    def check(self, *, version, dtype, shape, params, length):
        super().check(version=version, dtype=dtype, shape=shape, params=params, length=length)
        if params:
            raise FormatError(f"planes codec takes no params, got keys {sorted(params)}")
        k = STREAMS[dtype]
        if length < _align8(8 * k) + k * ans.HEADER_SIZE:
            raise FormatError(f"planes payload of {length} bytes cannot hold {k} streams")

    def decode(self, payload: memoryview, *, version: int, dtype: str, shape: tuple[int, ...],
               params: dict[str, Any]) -> np.ndarray:
        k = STREAMS[dtype]
        n = n_elements(shape)
        lengths = struct.unpack_from(f"<{k}Q", payload, 0)
        buf = np.frombuffer(payload, dtype=np.uint8)
        pos = 8 * k
        streams = []
        for i, length in enumerate(lengths):
            start = _align8(pos)
            if buf[pos:start].any():
                raise FormatError("padding bytes are not zero", pos)
            if length > len(buf) - start:
                raise FormatError(f"stream {i} of {length} bytes runs past the payload end", 8 * i)
            streams.append(ans.decode_symbols(buf[start:start + length], n_symbols=n))
            pos = start + length
        if pos != len(buf):
            raise FormatError(f"{len(buf) - pos} bytes after the last stream", pos)
        limits = {"bf16": (255, 255), "f16": (31, 2047), "f32": (255, 255, 255, 255)}[dtype]
        for i, (s, hi) in enumerate(zip(streams, limits)):
            if s.size and (s.min() < 0 or s.max() > hi):
                raise FormatError(f"stream {i} holds a symbol outside [0, {hi}]", 8 * i)
        bits = join(streams, dtype).reshape(shape)
        if dtype == "bf16":
            return bf16_bits_to_f32(bits)
        return bits.view(np.float16 if dtype == "f16" else np.float32)

    @staticmethod
    def encode(w: np.ndarray, *, dtype: str = "f32", chunk_size: int = ans.DEFAULT_CHUNK_SIZE) -> Encoded:
        """Lossless for values representable in `dtype` (bf16 may be given as '<u2' bit patterns)."""
        if dtype not in STREAMS:
            raise ValueError(f"planes codec: unknown dtype {dtype!r}")
        bits = bit_patterns(w, dtype)
        blocks = []
        for symbols in iter_streams(bits, dtype):
            blocks.append(ans.encode_symbols(symbols, chunk_size=chunk_size))
            del symbols  # before the next stream is computed
        head = struct.pack(f"<{len(blocks)}Q", *(len(b) for b in blocks))
        parts: list[bytes] = [head + bytes(_align8(len(head)) - len(head))]
        for i, b in enumerate(blocks):
            parts.append(b)
            if i + 1 < len(blocks):
                parts.append(bytes(_align8(len(b)) - len(b)))
        return Encoded(codec=PlanesCodec.id, codec_version=1, dtype=dtype, shape=tuple(int(d) for d in w.shape),
                       payload=parts)

    def examples(self) -> list[Encoded]:
        rng = np.random.default_rng(0)
        return [self.encode(rng.standard_normal(shape).astype(np.float32), dtype=dtype)
                for dtype in STREAMS for shape in [(0,), (5,), (3, 4), (40, 33)]]


PLANES = PlanesCodec()
