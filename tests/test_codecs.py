"""The lossy (ecsq) and lossless (planes) codecs: round trips, the test vectors, and the spec's reference decoders
run as an independent reading of format_spec/."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from occrt.codecs.ans_reference import reference_decode_symbols
from occrt.codecs.ecsq import ECSQ, CodingFrame, EcsqCodec
from occrt.codecs.planes import PlanesCodec
from occrt.codecs.rotation import RotationSpec
from occrt.errors import FormatError
from occrt.format import OccFile
from tests.codec_vectors import DIR, sha256_f32

SPEC = Path(__file__).resolve().parent.parent / "format_spec"


def _decode(enc):
    payload = b"".join(bytes(p) for p in (enc.payload if isinstance(enc.payload, list) else [enc.payload]))
    from occrt.codecs.registry import codec_for

    codec = codec_for(enc.codec)
    codec.check(version=enc.codec_version, dtype=enc.dtype, shape=enc.shape, params=enc.params, length=len(payload))
    return codec.decode(memoryview(payload), version=enc.codec_version, dtype=enc.dtype, shape=enc.shape,
                        params=enc.params), payload


def _spec_functions() -> dict:
    """Execute the reference code printed in the spec (trusted text in this repository) and return its functions."""
    ns: dict = {}
    rot = (SPEC / "rotations.md").read_text()
    exec(re.search(r"## 9\. Reference code.*?```python\n(.*?)```", rot, re.S).group(1), ns)
    occ = (SPEC / "occ.md").read_text()
    for name in ("decode_ecsq", "decode_planes", "decode_tcq"):
        exec(re.search(rf"```python\n(import numpy as np\ndef {name}.*?)```", occ, re.S).group(1), ns)
    return ns


@pytest.mark.parametrize("rot", [None, "in", "out", "both"])
@pytest.mark.parametrize("rank", [0, 3])
def test_ecsq_error_is_bounded_by_half_a_step(rot, rank):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 40)) @ np.diag(np.linspace(0.2, 3, 40))).astype(np.float32)
    r_in = RotationSpec(1, 5, 40) if rot in ("in", "both") else None
    r_out = RotationSpec(2, 6, 48) if rot in ("out", "both") else None
    frame = CodingFrame(w, rot_in=r_in, rot_out=r_out, rank=rank)
    step = 0.05
    enc = frame.encode(step)
    got, _ = _decode(enc)
    assert got.shape == w.shape and got.dtype == np.float32
    # in the coding frame every residual entry is off by at most step/2 (plus float32 rounding)
    from occrt.codecs.ecsq import to_coding_frame

    err_frame = to_coding_frame(got - w, rot_in=r_in, rot_out=r_out)
    assert np.abs(err_frame).max() <= step / 2 * (1 + 1e-3) + 1e-5
    assert abs(frame.distortion(step) - float(((got - w).astype(np.float64) ** 2).sum())) < 1e-3 * frame.distortion(step) + 1e-6


def test_ecsq_low_rank_part_takes_the_structure():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 48)) * 3 + 0.01 * rng.standard_normal((64, 48)))
    w = w.astype(np.float32)
    plain, ranked = CodingFrame(w), CodingFrame(w, rank=4)
    assert np.abs(ranked.residual).max() < 0.1 * np.abs(plain.residual).max()
    step = 0.01
    assert len(_decode(ranked.encode(step))[1]) < len(_decode(plain.encode(step))[1])


def test_ecsq_scales_scale_the_step():
    w = np.ones((4, 6), np.float32) * 0.33
    enc = EcsqCodec.encode(w, step=0.2, row_scales=np.array([1, 2, 4, 8.0]), col_scales=np.ones(6))
    got, _ = _decode(enc)
    expected = np.rint(0.33 / (0.2 * np.array([1, 2, 4, 8.0])))[:, None] * 0.2 * np.array([1, 2, 4, 8.0])[:, None]
    assert np.allclose(got, np.broadcast_to(expected, w.shape))


@pytest.mark.parametrize("bad", [
    {"step": 0.0}, {"step": float("inf")}, {"step": True}, {"rank": -1}, {"rank": 99}, {"row_scales": 1},
    {"rot_in": {"construction": 1, "seed": 1, "n": 7}}, {"extra": 1},
])
def test_ecsq_check_rejects_bad_params(bad):
    enc = EcsqCodec.encode(np.ones((8, 10), np.float32), step=0.1)
    params = {**enc.params, **bad}
    with pytest.raises(FormatError):
        ECSQ.check(version=1, dtype="f32", shape=(8, 10), params=params, length=10 ** 4)


def test_ecsq_rejects_wrong_symbol_count():
    a = EcsqCodec.encode(np.ones((8, 10), np.float32), step=0.1)
    _, payload = _decode(a)
    with pytest.raises(FormatError):
        ECSQ.decode(memoryview(payload), version=1, dtype="f32", shape=(8, 11), params=a.params)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_planes_is_lossless(dtype):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 300)) * 0.02).astype(np.float32)
    w.flat[:6] = [0.0, -0.0, np.inf, -np.inf, 1e-40, 65504.0]
    enc = PlanesCodec.encode(w, dtype=dtype)
    got, payload = _decode(enc)
    if dtype == "f32":
        assert np.array_equal(got.view(np.uint32), w.view(np.uint32))
    elif dtype == "f16":
        assert np.array_equal(got.view(np.uint16), w.astype(np.float16).view(np.uint16))
    else:
        from occrt.format.constants import f32_to_bf16_bits

        assert np.array_equal((got.view(np.uint32) >> 16).astype(np.uint16), f32_to_bf16_bits(w))
    # exponents of trained-like weights compress: fewer bytes than raw
    assert len(payload) < w.size * {"f32": 4, "f16": 2, "bf16": 2}[dtype]


def test_vectors_decode_to_their_recorded_hashes():
    record = json.loads((DIR / "vectors.json").read_text())
    assert len(record) >= 11
    for name, r in record.items():
        with OccFile.open(DIR / r["file"]) as f:
            assert sha256_f32(f.tensor(name)) == r["sha256"], name


def test_spec_reference_decoders_read_the_vectors():
    """An independent reading of the spec: the reference code printed in format_spec/ decodes every vector."""
    ns = _spec_functions()
    record = json.loads((DIR / "vectors.json").read_text())
    for name, r in record.items():
        with OccFile.open(DIR / r["file"]) as f:
            e = f.tensors[name]
            section = bytes(f.payload(e))
            ours = f.tensor(name).astype(np.float32)
        if e.codec == 1:
            theirs = ns["decode_ecsq"](section, e.shape, e.params, reference_decode_symbols, ns["rotation_matrix"])
        elif e.codec == 2:
            theirs = ns["decode_planes"](section, e.dtype, e.shape, reference_decode_symbols)
        elif e.codec == 3:
            theirs = ns["decode_tcq"](section, e.shape, e.params, reference_decode_symbols, ns["rotation_matrix"])
        else:
            continue  # raw: test_format_spec runs its reference decoder
        theirs = np.asarray(theirs, dtype=np.float32)
        if r["exact"]:
            assert sha256_f32(theirs) == r["sha256"], name
        else:
            assert np.allclose(theirs, ours, rtol=1e-5, atol=1e-6 * float(np.abs(ours).max())), name
            assert not math.isnan(float(theirs.sum()))
