"""The .occ container: round trips, determinism, all-or-nothing writes, and files the reader must reject."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest

from occrt.codecs.base import Encoded
from occrt.codecs.raw import RawCodec
from occrt.codecs.registry import CODECS
from occrt.errors import FormatError, OccError
from occrt.format import OccFile, OccWriter
from occrt.format import constants as C


def write_sample(path, *, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        "a.f32": rng.standard_normal((7, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((3, 4, 2)).astype(np.float32),
        "c.bf16": rng.standard_normal((65,)).astype(np.float32),
        "d.empty": np.zeros((0, 3), np.float32),
        "e.scalar": np.array(3.5, np.float32),
    }
    dtypes = {"a.f32": "f32", "b.f16": "f16", "c.bf16": "bf16", "d.empty": "f32", "e.scalar": "f32"}
    with OccWriter(path, overwrite=True) as w:
        w.set_metadata("model.config", {"x": 1, "y": [1.5, "z"]})
        w.set_metadata("note", "héllo")
        w.add_blob("tokenizer.json", b'{"t": 1}')
        for name, a in tensors.items():
            w.add_tensor(name, RawCodec.encode(a, dtype=dtypes[name]))
        w.finish()
    return tensors


def test_round_trip_every_dtype(tmp_path):
    path = tmp_path / "s.occ"
    tensors = write_sample(path)
    with OccFile.open(path) as f:
        assert f.metadata["note"] == "héllo"
        assert f.blob("tokenizer.json") == b'{"t": 1}'
        assert np.array_equal(f.tensor("a.f32"), tensors["a.f32"])
        assert np.array_equal(f.tensor("b.f16"), tensors["b.f16"].astype(np.float16))
        c = f.tensor("c.bf16")
        assert c.dtype == np.float32 and np.abs(c - tensors["c.bf16"]).max() <= 2 ** -8 * np.abs(tensors["c.bf16"]).max()
        assert f.tensor("d.empty").shape == (0, 3)
        assert f.tensor("e.scalar").shape == () and float(f.tensor("e.scalar")) == 3.5
        summary = f.verify()
        assert summary["tensors"] == 5 and summary["blobs"] == 1
        for e in list(f.tensors.values()) + list(f.blobs.values()):
            assert (e.offset - f.data_start) % C.ALIGNMENT == 0


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, np.inf, 65504.0], np.float32)
    bits = C.f32_to_bf16_bits(x)
    back = C.bf16_bits_to_f32(bits)
    assert back.tolist() == [1.0, 1.0, 1 + 4 * 2 ** -8, -2.5, np.inf, 65536.0]


def test_writer_is_deterministic(tmp_path):
    write_sample(tmp_path / "1.occ")
    write_sample(tmp_path / "2.occ")
    h = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("1.occ", "2.occ")]
    assert h[0] == h[1]


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "out.occ"
    with pytest.raises(RuntimeError):
        with OccWriter(path) as w:
            w.add_tensor("x", RawCodec.encode(np.ones(4, np.float32)))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_to_overwrite_without_permission(tmp_path):
    path = tmp_path / "out.occ"
    path.write_bytes(b"precious")
    with pytest.raises(OccError, match="already exists"):
        OccWriter(path)
    assert path.read_bytes() == b"precious"


def test_writer_rejects_inconsistent_records(tmp_path):
    with OccWriter(tmp_path / "x.occ") as w:
        bad = Encoded(codec=0, codec_version=1, dtype="f32", shape=(4,), payload=b"\0" * 12)
        with pytest.raises(FormatError, match="needs 16 bytes"):
            w.add_tensor("x", bad)
        with pytest.raises(ValueError, match="not a finite number"):
            w.set_metadata("k", float("nan"))
        w.add_tensor("y", RawCodec.encode(np.ones(2, np.float32)))
        with pytest.raises(ValueError, match="duplicate"):
            w.add_tensor("y", RawCodec.encode(np.ones(2, np.float32)))


# -- hostile files ----------------------------------------------------------------------------------------------------
def _parts(data: bytes):
    magic, major, minor, crc, n = struct.unpack_from(C.PRELUDE_FORMAT, data, 0)
    header = json.loads(data[C.PRELUDE_SIZE:C.PRELUDE_SIZE + n])
    return header, data[C.align_up(C.PRELUDE_SIZE + n):]


def _assemble(header: dict, body: bytes, *, major: int = 1, minor: int = 0, fix_crc: bool = True) -> bytes:
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, major, minor, 0, len(h))
    crc = zlib.crc32(h, zlib.crc32(head[16:24], zlib.crc32(head[0:12])))
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, major, minor, crc if fix_crc else 0, len(h))
    pad = b"\0" * (C.align_up(len(head) + len(h)) - len(head) - len(h))
    return head + h + pad + body


@pytest.fixture()
def sample_bytes(tmp_path) -> bytes:
    write_sample(tmp_path / "s.occ")
    return (tmp_path / "s.occ").read_bytes()


def _edit(sample: bytes, fn) -> bytes:
    header, body = _parts(sample)
    out = fn(header, body)
    return out if isinstance(out, bytes) else _assemble(header, body)


def _tensor(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


HOSTILE = {
    "empty file": (lambda s: b"", "shorter than"),
    "truncated prelude": (lambda s: s[:20], "shorter than"),
    "truncated data": (lambda s: s[:-10], "describes"),
    "trailing bytes": (lambda s: s + b"\0" * 64, "describes"),
    "wrong magic": (lambda s: b"GGUF" + s[4:], "wrong magic"),
    "future major version": (lambda s: s[:8] + struct.pack("<H", 2) + s[10:], "version 2"),
    "huge header length": (lambda s: s[:16] + struct.pack("<Q", 1 << 60) + s[24:], "header length"),
    "header past end": (lambda s: s[:16] + struct.pack("<Q", len(s)) + s[24:], "past the end"),
    "bad header checksum": (lambda s: s[:12] + b"\0\0\0\0" + s[16:], "header checksum"),
    "flipped minor version": (lambda s: s[:10] + struct.pack("<H", 1) + s[12:], "header checksum"),
    "bad data checksum": (lambda s: s[:-1] + bytes([s[-1] ^ 1]), "checksum mismatch"),
    "not json": (lambda s: _edit(s, lambda h, b: _assemble_raw(b"{not json", b)), "not valid JSON"),
    "offset out of bounds": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(offset=1 << 40)),
                             "offset"),
    "length out of bounds": (lambda s: _edit(s, lambda h, b: _tensor(h, "c.bf16").update(length=10 ** 9)),
                             "length"),
    "overlapping sections": (lambda s: _edit(s, lambda h, b: _tensor(h, "b.f16").update(
        offset=_tensor(h, "a.f32")["offset"])), "overlaps|needs"),
    "unaligned offset": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(offset=3)), "multiple of"),
    "unknown codec": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(codec=999)), "unknown codec"),
    "unknown codec version": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(codec_version=9)),
                              "no version 9"),
    "unknown dtype": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(dtype="f64")), "unknown dtype"),
    "shape disagrees with length": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(shape=[7, 6])),
                                    "needs"),
    "negative dimension": (lambda s: _edit(s, lambda h, b: _tensor(h, "a.f32").update(shape=[-7, -5])),
                           "shape"),
    "too many dimensions": (lambda s: _edit(s, lambda h, b: _tensor(h, "d.empty").update(shape=[1] * 9 + [0])),
                            "dimensions"),
    "boolean as integer": (lambda s: _edit(s, lambda h, b: _tensor(h, "e.scalar").update(length=True)),
                           "integer"),
    "duplicate tensor names": (lambda s: _edit(s, lambda h, b: _tensor(h, "b.f16").update(name="a.f32")),
                               "duplicate"),
    "control character in name": (lambda s: _edit(s, lambda h, b: _tensor(h, "b.f16").update(name="a\nb")),
                                  "control"),
    "unknown header key": (lambda s: _edit(s, lambda h, b: h.update(extra=1)), "unknown keys"),
    "missing header key": (lambda s: _edit(s, lambda h, b: h.pop("blobs")), "lacks"),
    "nonzero padding": (lambda s: _edit(s, lambda h, b: _assemble(h, _poke_padding(h, b))), "padding"),
    "data_length lies": (lambda s: _edit(s, lambda h, b: h.update(data_length=h["data_length"] + 64)),
                         "describes"),
}


def _assemble_raw(header_bytes: bytes, body: bytes) -> bytes:
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, 1, 0, 0, len(header_bytes))
    crc = zlib.crc32(header_bytes, zlib.crc32(head[16:24], zlib.crc32(head[0:12])))
    head = struct.pack(C.PRELUDE_FORMAT, C.MAGIC, 1, 0, crc, len(header_bytes))
    pad = b"\0" * (C.align_up(len(head) + len(header_bytes)) - len(head) - len(header_bytes))
    return head + header_bytes + pad + body


def _poke_padding(header, body: bytes) -> bytes:
    a = _tensor(header, "a.f32")  # 140 bytes: followed by padding up to the next 64-byte boundary
    at = a["offset"] + a["length"]
    return body[:at] + b"\x01" + body[at + 1:]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_reader_rejects(case, sample_bytes):
    make, message = HOSTILE[case]
    data = make(sample_bytes)
    with pytest.raises(FormatError, match=message) as err:
        f = OccFile.from_bytes(data)
        f.verify()  # data checksums are checked when sections are read
    assert "invalid .occ file" in str(err.value)


def test_errors_name_the_offset(sample_bytes):
    data = sample_bytes[:-1] + bytes([sample_bytes[-1] ^ 0x80])
    f = OccFile.from_bytes(data)
    with pytest.raises(FormatError) as err:
        f.verify()
    last = max(f.tensors.values(), key=lambda e: e.offset)
    assert err.value.offset == last.offset
    assert f"at byte {last.offset}" in str(err.value)


def test_every_codec_in_the_registry_round_trips():
    # the raw codec is the only one with no options; later codecs add their own round-trip tests
    assert CODECS[0].name == "raw"
    rng = np.random.default_rng(1)
    for dtype in C.DTYPES:
        a = rng.standard_normal((5, 9)).astype(np.float32)
        enc = RawCodec.encode(a, dtype=dtype)
        back = CODECS[0].decode(memoryview(bytes(enc.payload)), version=1, dtype=dtype, shape=enc.shape, params={})
        tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2}[dtype]
        assert np.abs(back.astype(np.float32) - a).max() <= tol * np.abs(a).max()
