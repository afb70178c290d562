"""Fuzzing the reader, every codec's decoder and the model loader (hypothesis).

The property, for every input: opening and verifying it ends in a decoded file or in `FormatError`, never another
exception, a hang, or memory out of proportion to the file (see `open_and_verify`). Inputs are mutations of real
files: raw byte edits (which the CRCs stop early), and structural edits of the header JSON and of section payloads
with the checksums recomputed, which is what reaches the index checks and the decoders. Every codec in
`occrt.codecs.registry.CODECS` is fuzzed from its `examples()`, so a codec added there is covered without editing
this file.

CI runs each target for a bounded number of examples with a fixed seed (`derandomize`). To search further:

    OCCRT_FUZZ_EXAMPLES=20000 OCCRT_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py
"""
from __future__ import annotations

import copy
import faulthandler
import json
import os
import resource
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

import occrt
from occrt.codecs.registry import CODECS
from occrt.errors import FormatError
from occrt.format import OccFile
from tests.occ_samples import (assemble, codec_examples, refresh_section_crcs, sample_bytes, split,
                               tiny_model_bytes)

EXAMPLES = int(os.environ.get("OCCRT_FUZZ_EXAMPLES", "0"))  # 0: each target's CI default
SEED = os.environ.get("OCCRT_FUZZ_SEED")
HANG_SECONDS = 300  # a target that runs this long is hung: dump every thread's stack and fail the run


def fuzz(ci_examples: int):
    """Settings of a fuzz target: bounded, reproducible, no example database written into the repository."""
    def decorate(test):
        test = settings(max_examples=EXAMPLES or ci_examples, derandomize=SEED is None, deadline=None,
                        database=None, suppress_health_check=list(HealthCheck), print_blob=True)(test)
        return seed(int(SEED))(test) if SEED is not None else test
    return decorate


@pytest.fixture(autouse=True)
def hang_and_memory_guard():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    yield
    faulthandler.cancel_dump_traceback_later()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 1 << 20, f"peak memory grew by {grown} KiB while fuzzing"


# -- the property ---------------------------------------------------------------------------------------------------
def open_and_verify(data: bytes) -> dict | None:
    """Open `data` and decode everything. Returns verify()'s summary, or None when the file is rejected.

    Memory: numpy allocations (traced) stay within 32 bytes per file byte (the header as Python objects) plus
    64 bytes per element of the largest tensor the validated index declares (decoders' working arrays), plus 1 MiB.
    """
    occ = None
    tracemalloc.start()
    try:
        try:
            occ = OccFile.from_bytes(data)
            summary = occ.verify()
        except FormatError as e:
            assert "invalid .occ file" in str(e)
            summary = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = max((t.n_elements for t in occ.tensors.values()), default=0) if occ is not None else 0
    assert peak <= 32 * len(data) + 64 * largest + (1 << 20), f"{peak} bytes traced for a {len(data)}-byte file"
    return summary


# -- strategies -----------------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096, 65535, 65536,
               (1 << 20), (1 << 24), (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 53, (1 << 63) - 1,
               1 << 63, (1 << 64) - 1]

json_scalars = (st.none() | st.booleans() | st.sampled_from(INTERESTING) | st.sampled_from([-1, -(1 << 63), 1 << 64])
                | st.integers() | st.floats() | st.text(max_size=6)
                | st.sampled_from(["", "raw", "f32", "f16", "bf16", "\ud800", "a\nb", "x" * 600]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def edit_bytes(draw, data: bytes, *, keep_length: bool = False) -> bytes:
    """1-4 edits: bit flips, bytes and little-endian integers set to edge values, cuts, insertions, duplications."""
    buf = bytearray(data)
    ops = ["flip", "byte", "int"] + ([] if keep_length else ["truncate", "extend", "delete", "duplicate"])
    for _ in range(draw(st.integers(1, 4))):
        op, n = draw(st.sampled_from(ops)), len(buf)
        if n == 0 and op in ("flip", "byte", "int", "delete", "duplicate"):
            continue
        if op == "flip":
            buf[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op == "int":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            at = draw(st.integers(0, max(n - width, 0)))
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)) % (1 << (8 * width))
            buf[at:at + width] = value.to_bytes(width, "little")[:n - at]
        elif op == "truncate":
            del buf[draw(st.integers(0, n)):]
        elif op == "extend":
            at = draw(st.integers(0, n))
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 64)))
            if op == "delete":
                del buf[i:j]
            else:
                buf[j:j] = buf[i:j]
    return bytes(buf)


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON value, depth first."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((value, k))
        out += _slots(v)
    return out


@st.composite
def edit_json(draw, value: Any) -> Any:
    """1-3 edits of a JSON value: replace a value (anything, or an integer nudged by a little), drop or add a key."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(value)
        if not slots:
            return draw(json_values)
        container, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["replace", "nudge", "drop", "add"]))
        old = container[key]
        if op == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            container[key] = old + draw(st.sampled_from([-64, -1, 1, 64])) if draw(st.booleans()) else 2 * old
        elif op == "drop":
            del container[key]
        elif op == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=6))] = draw(json_values)
        else:
            container[key] = draw(json_values)
    return value


# -- targets --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample() -> bytes:
    data = sample_bytes(max_examples_per_codec=3)
    assert open_and_verify(data) is not None
    return data


def test_fuzz_file_bytes(sample):
    @fuzz(500)
    @given(data=st.data())
    def run(data):
        event("decoded" if open_and_verify(data.draw(edit_bytes(sample))) else "rejected")

    run()


def test_fuzz_file_structure(sample):
    header, body = split(sample)

    @fuzz(500)
    @given(data=st.data())
    def run(data):
        h = data.draw(edit_json(header)) if data.draw(st.booleans()) else copy.deepcopy(header)
        b = data.draw(edit_bytes(body, keep_length=True)) if data.draw(st.booleans()) else body
        if isinstance(h, dict):
            refresh_section_crcs(h, b)  # so the mutation reaches the decoders, not just the CRC check
        event("decoded" if open_and_verify(assemble(h, b, lax=True)) else "rejected")

    run()


def _one_tensor_file(enc_fields: dict[str, Any], payload: bytes) -> bytes:
    entry = {**enc_fields, "name": "t", "offset": 0, "length": len(payload), "crc32": zlib.crc32(payload)}
    return assemble({"metadata": {}, "blobs": [], "tensors": [entry], "data_length": len(payload)}, payload, lax=True)


@pytest.mark.parametrize("codec_id", sorted(CODECS), ids=lambda i: CODECS[i].name)
def test_fuzz_codec_decode(codec_id):
    """One tensor of the codec per file: payload bytes, params, shape, dtype and version mutated, CRCs kept valid."""
    examples = []
    for enc in codec_examples(CODECS[codec_id]):
        payload = b"".join(bytes(p) for p in (enc.payload if isinstance(enc.payload, list) else [enc.payload]))
        fields = {"dtype": enc.dtype, "shape": list(enc.shape), "codec": enc.codec, "codec_version": enc.codec_version,
                  "params": enc.params}
        assert open_and_verify(_one_tensor_file(fields, payload)) is not None, "an unmutated example must decode"
        examples.append((fields, payload))

    @fuzz(300)
    @given(data=st.data())
    def run(data):
        fields, payload = data.draw(st.sampled_from(examples))
        fields = copy.deepcopy(fields)
        if data.draw(st.booleans()):
            payload = data.draw(edit_bytes(payload))
        if data.draw(st.integers(0, 3)) == 0:
            fields["params"] = data.draw(edit_json(fields["params"])) if fields["params"] else data.draw(json_values)
        if data.draw(st.integers(0, 3)) == 0:
            fields["shape"] = data.draw(edit_json(fields["shape"])) if fields["shape"] else [data.draw(json_values)]
        if data.draw(st.integers(0, 7)) == 0:
            fields["dtype"] = data.draw(st.sampled_from(["f32", "f16", "bf16", "f64", 4]))
        if data.draw(st.integers(0, 7)) == 0:
            fields["codec_version"] = data.draw(st.sampled_from([0, 2, -1, True, 1 << 40]))
        event("decoded" if open_and_verify(_one_tensor_file(fields, payload)) else "rejected")

    run()


def test_fuzz_load(tmp_path):
    """Model metadata (config, tokenizer ids, template, defaults) and the tokenizer blob, through `occrt.load`."""
    header, body = split(tiny_model_bytes())
    tokenizer = next(b for b in header["blobs"] if b["name"] == "tokenizer.json")
    path = tmp_path / "m.occ"

    @fuzz(150)
    @given(data=st.data())
    def run(data):
        h = copy.deepcopy(header)
        h["metadata"] = data.draw(edit_json(h["metadata"]))
        b = body
        if data.draw(st.integers(0, 4)) == 0:  # the tokenizer JSON, edited in place (same length)
            start, n = tokenizer["offset"], tokenizer["length"]
            b = body[:start] + data.draw(edit_bytes(body[start:start + n], keep_length=True)) + body[start + n:]
            refresh_section_crcs(h, b)
        path.write_bytes(assemble(h, b, lax=True))
        try:
            model = occrt.load(path)
        except FormatError:
            event("rejected")
            return
        event("loaded")
        model.close()

    run()


def test_edit_strategies_reach_the_decoders(sample):
    """The structural target is useful only if mutated payloads get past the CRCs: check that some do."""
    header, body = split(sample)
    rng = np.random.default_rng(0)
    decoded_after_edit = 0
    for _ in range(50):
        b = bytearray(body)
        b[int(rng.integers(len(b)))] ^= 0xFF
        h = json.loads(json.dumps(header))
        refresh_section_crcs(h, bytes(b))
        if open_and_verify(assemble(h, bytes(b))) is not None:
            decoded_after_edit += 1
    assert decoded_after_edit > 0
