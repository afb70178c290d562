"""Codec 0, `raw`: the tensor's elements in row-major order, little-endian, in its dtype (f32, f16 or bf16).

payload length = n_elements x itemsize(dtype); `params` is the empty object. Decoding is a zero-copy view of the
memory-mapped file for f32 and f16; bf16 is widened exactly to float32 (numpy has no bfloat16).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from occrt.codecs.base import Codec, Encoded, n_elements
from occrt.errors import FormatError
from occrt.format.constants import DTYPES, bf16_bits_to_f32, f32_to_bf16_bits


class RawCodec(Codec):
    id = 0
    name = "raw"
    versions = (1,)

    def check(self, *, version, dtype, shape, params, length):
        super().check(version=version, dtype=dtype, shape=shape, params=params, length=length)
        if params:
            raise FormatError(f"raw codec takes no params, got keys {sorted(params)}")
        expected = n_elements(shape) * DTYPES[dtype][0]
        if length != expected:
            raise FormatError(f"raw {dtype} tensor of shape {list(shape)} needs {expected} bytes, section has {length}")

    def decode(self, payload: memoryview, *, version: int, dtype: str, shape: tuple[int, ...],
               params: dict[str, Any]) -> np.ndarray:
        a = np.frombuffer(payload, dtype=DTYPES[dtype][1]).reshape(shape)
        if dtype == "bf16":
            return bf16_bits_to_f32(a)
        return a

    @staticmethod
    def encode(w: np.ndarray, *, dtype: str = "f32") -> Encoded:
        """Store `w` in `dtype`. f32 -> f16/bf16 rounds to nearest even; bf16 input may be given as '<u2' bits."""
        if dtype not in DTYPES:
            raise ValueError(f"raw codec: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if dtype == "bf16":
            bits = w if w.dtype == np.uint16 else f32_to_bf16_bits(np.asarray(w, dtype=np.float32))
            data = np.ascontiguousarray(bits, dtype="<u2")
        else:
            data = np.ascontiguousarray(w, dtype=DTYPES[dtype][1])
        return Encoded(codec=RawCodec.id, codec_version=1, dtype=dtype, shape=tuple(int(d) for d in w.shape),
                       payload=memoryview(data.reshape(-1).view(np.uint8)))

    def examples(self) -> list[Encoded]:
        rng = np.random.default_rng(0)
        return [self.encode(rng.standard_normal(shape).astype(np.float32), dtype=dtype)
                for dtype in DTYPES for shape in [(), (0, 3), (5,), (3, 4)]]


RAW = RawCodec()
