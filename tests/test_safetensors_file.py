"""converters/safetensors_file.py: the same tensors as the safetensors package, checks before trust, pages given
back after each tensor."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from occrt.converters.safetensors_file import SafetensorsFile
from occrt.errors import ConversionError


def _write(path, header: dict, data: bytes) -> str:
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def test_reads_what_safetensors_wrote(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"b.f32": rng.standard_normal((3, 5)).astype(np.float32),
               "a.f16": rng.standard_normal((7,)).astype(np.float16),
               "c.empty": np.zeros((0, 4), np.float32), "d.scalar": np.array(2.5, dtype=np.float32)}
    bf16_bits = rng.integers(0, 1 << 16, size=(2, 3), dtype=np.uint16)
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    with SafetensorsFile(path) as f:
        assert list(f.entries) == sorted(tensors)  # name order, as the safetensors package lists them
        for name, want in tensors.items():
            got = f.tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
            assert not got.flags.writeable  # a view of the read-only mapping
            f.release(name)
            assert np.array_equal(got, want)  # still valid after its pages were handed back
    # bf16 comes back as its bits
    hdr = {"x": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}, "__metadata__": {"k": "v"}}
    path = _write(tmp_path / "bf.safetensors", hdr, bf16_bits.astype("<u2").tobytes())
    with SafetensorsFile(path) as f:
        assert f.entries["x"].dtype == "bf16" and np.array_equal(f.tensor("x"), bf16_bits)


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "overlap"),
    ({"x": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype I8"),
    ({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown to safetensors"),
    ({"x": [1, 2]}, b"", "not an object"),
])
def test_rejects_bad_headers(tmp_path, header, data, message):
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ConversionError, match=message) as e:
        SafetensorsFile(path)
    assert path in str(e.value)


def test_rejects_bad_prefix(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\0")
    with pytest.raises(ConversionError, match="too short"):
        SafetensorsFile(str(short))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ConversionError, match="header size"):
        SafetensorsFile(str(huge))
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(struct.pack("<Q", 3) + b"\xff{}")
    with pytest.raises(ConversionError, match="not UTF-8 JSON"):
        SafetensorsFile(str(notjson))
