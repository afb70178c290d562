"""The spec (format_spec/occ.md) and the code agree: magic, version, limits, the codec table, and the reference
decoder printed in the spec."""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from occrt.codecs.registry import CODECS
from occrt.format import constants as C

SPEC = (Path(__file__).resolve().parent.parent / "format_spec" / "occ.md").read_text()


def _section(title: str) -> str:
    start = SPEC.index(title)
    nxt = re.search(r"\n#{2,3} ", SPEC[start + len(title):])
    return SPEC[start: start + len(title) + (nxt.start() if nxt else len(SPEC))]


def test_magic_and_version():
    hex_bytes = re.search(r"\| magic \| `([0-9A-F ]+)`", SPEC).group(1)
    assert bytes.fromhex(hex_bytes) == C.MAGIC
    assert re.search(r"\| version_major \| `(\d+)`", SPEC).group(1) == str(C.VERSION_MAJOR)
    assert re.search(r"\| version_minor \| `(\d+)`", SPEC).group(1) == str(C.VERSION_MINOR)
    assert f"2 ≤ n ≤ {C.MAX_HEADER_BYTES:,}".replace(",", " ") in SPEC


def test_limits_table():
    table = _section("### 3.1 Limits")
    number = lambda label: int(re.search(rf"\| {label} \| ([\d ]+)", table).group(1).replace(" ", ""))
    assert number("header length") == C.MAX_HEADER_BYTES
    assert number("tensors") == C.MAX_TENSORS
    assert number("blobs") == C.MAX_BLOBS
    assert number("name length") == C.MAX_NAME_BYTES
    assert number("dimensions per tensor") == C.MAX_NDIM
    assert "2⁴⁰" in table and C.MAX_DIM == C.MAX_ELEMENTS == 1 << 40
    assert number("JSON nesting") == C.MAX_JSON_DEPTH
    assert number("elements per section byte") == C.MAX_ELEMENTS_PER_BYTE
    assert number("JSON integer digits") == C.MAX_JSON_INT_DIGITS and C.JSON_INT_RANGE == (-(1 << 63), (1 << 64) - 1)


def test_limits_table_entropy_coded_blocks():
    from occrt.codecs import ans

    table = _section("### 3.1 Limits")
    number = lambda label: int(re.search(rf"\| {label} \| ([\d ]+)", table).group(1).replace(" ", ""))
    assert "symbols | 2³²" in table and ans.MAX_SYMBOLS == 1 << 32
    assert number("entropy-coded block: chunk size") == ans.MAX_CHUNK_SIZE
    assert number("entropy-coded block: frequency table entries") == ans.MAX_RANGE + 1


def test_codec_table_matches_registry():
    rows = re.findall(r"^\| (\d+) \| (\w+) \| ([\d, ]+) \|", _section("## 5. Codecs"), re.M)
    spec = {int(i): (name, tuple(int(v) for v in versions.split(","))) for i, name, versions in rows}
    code = {i: (c.name, tuple(c.versions)) for i, c in CODECS.items()}
    assert spec == code


def test_crc_check_value():
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_spec_reference_decoder_runs():
    code = re.search(r"```python\n(import numpy as np\ndef decode_raw.*?)```", SPEC, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "occ.md", "exec"), ns)  # the spec's own example, run as a test (trusted text in this repo)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(ns["decode_raw"](a.tobytes(), "f32", [2, 3]), a)
    bf = (a.view(np.uint32) >> 16).astype("<u2").tobytes()
    assert np.array_equal(ns["decode_raw"](bf, "bf16", [2, 3]), a)


def test_model_config_keys_are_the_spec_table():
    """Every ModelConfig field has a row in 4.1 (and no row names a key the reader would reject), optional ones
    marked with their default; the architecture labels are the ones the reader accepts."""
    import dataclasses

    from occrt.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

    table = _section("### 4.1 Model configuration")
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| [^|]+ \| (yes|no[^|]*) \|", table, flags=re.M)
    documented = {}
    for keys, required in rows:
        for key in re.findall(r"`(\w+)`", keys):
            documented[key] = required
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(documented) == set(fields)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        always_written = name in ("rope", "attention_bias", "mlp_bias", "hidden_act")
        assert (documented[name] == "yes") == (required or always_written), name
    listed = re.search(r"\| `architecture` \| string \| yes \| [^|]*?: ((?:`\"\w+\"`(?:, )?)+)", table).group(1)
    assert tuple(re.findall(r'"(\w+)"', listed)) == SUPPORTED_ARCHITECTURES
