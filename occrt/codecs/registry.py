"""The codec registry: stable integer id -> codec. Ids are never reused; a retired codec keeps its line, commented.

Adding a codec: write its module (a `Codec` subclass with `check`, `decode` and an `encode`), add one line here and
its section in `format_spec/occ.md` (tests/test_format_spec.py checks that the spec's table matches this one). Every
codec here is fuzzed and bit-flipped automatically (tests/test_fuzz.py, tests/test_hostile.py) from its `examples()`.
"""
from __future__ import annotations

from occrt.codecs.base import Codec
from occrt.codecs.ecsq import ECSQ
from occrt.codecs.planes import PLANES
from occrt.codecs.raw import RAW
from occrt.codecs.tcq import TCQ
from occrt.errors import FormatError

CODECS: dict[int, Codec] = {
    0: RAW,  # raw: elements in their dtype (f32/f16/bf16)
    1: ECSQ,  # ecsq: rotations + low-rank part + entropy-coded uniform residual (lossy)
    2: PLANES,  # planes: float bit fields as separate ANS streams (lossless)
    3: TCQ,  # tcq: the ecsq frame with trellis-coded, entropy-coded codes (lossy)
}


def codec_for(codec_id: int) -> Codec:
    try:
        return CODECS[codec_id]
    except KeyError:
        raise FormatError(f"unknown codec id {codec_id}; this reader knows {sorted(CODECS)} "
                          f"(a newer occrt may read this file)") from None
